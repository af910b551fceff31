#!/usr/bin/env bash
# A real single-node Slurm cluster with accounting, on this machine, for tests and demos.
#
#   slurm/cluster.sh install   apt-get the packages (root), without starting their services
#   slurm/cluster.sh start     munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd
#   slurm/cluster.sh stop      stop them (slurmd first), by pid file, SIGKILL after a deadline
#   slurm/cluster.sh env       print the export lines clients need (SLURM_CONF)
#
# Every file (config, state, spool, logs, munge socket and key, database) lives under
# $RESPECT_SLURM_ROOT (default /tmp/respect-slurm). Runs as root. Ports: 6817-6819 and a
# free one on 127.0.0.1 for MariaDB.
set -euo pipefail

ROOT=${RESPECT_SLURM_ROOT:-/tmp/respect-slurm}
CLUSTER=respect
HOST=$(hostname -s)
MUNGE_SOCKET=$ROOT/munge/munge.socket.2
DB_SOCKET=$ROOT/mysql/mysqld.sock
DB_PASS=respect-slurm-db

log() { echo "slurm/cluster.sh: $*" >&2; }

fail() {
  log "$1"
  for f in "$ROOT"/log/*.log; do [ -f "$f" ] && { echo "---- $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out waiting for $what"
    sleep 0.3
  done
}

install() {
  [ "$(id -u)" = 0 ] || { log "install needs root"; exit 1; }
  command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
    && command -v munged >/dev/null && return 0
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d   # keep apt from starting the services
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_configs() {
  local db_port=$1 cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat > "$ROOT/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStoragePass=socket=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
JobRequeue=1
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  cat > "$ROOT/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$ROOT/run/slurmdbd.pid
LogFile=$ROOT/log/slurmdbd.log
EOF
  chmod 600 "$ROOT/etc/slurmdbd.conf"
}

start() {
  [ "$(id -u)" = 0 ] || { log "start needs root"; exit 1; }
  if [ -f "$ROOT/run/slurmd.pid" ] && kill -0 "$(cat "$ROOT/run/slurmd.pid")" 2>/dev/null; then
    log "already running under $ROOT"; return 0
  fi
  stop  # whatever an earlier, failed start left running under $ROOT
  rm -rf "$ROOT"
  mkdir -p "$ROOT"/{etc,state,spool,log,run,munge,mysql}
  export SLURM_CONF=$ROOT/etc/slurm.conf
  local db_port; db_port=$(free_port)
  write_configs "$db_port"

  chown munge:munge "$ROOT/munge"; chmod 0755 "$ROOT/munge"
  dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$ROOT/munge/munge.key"; chmod 0600 "$ROOT/munge/munge.key"
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$ROOT/munge/munge.key" \
    --pid-file="$ROOT/munge/munged.pid" --log-file="$ROOT/munge/munged.log" --seed-file="$ROOT/munge/seed" \
    || fail "munged did not start"
  wait_for 10 munged test -S "$MUNGE_SOCKET"

  mariadb-install-db --no-defaults --datadir="$ROOT/mysql" --user=root --auth-root-authentication-method=normal \
    >"$ROOT/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed"
  mariadbd --no-defaults --datadir="$ROOT/mysql" --socket="$DB_SOCKET" --port="$db_port" \
    --bind-address=127.0.0.1 --user=root --pid-file="$ROOT/run/mariadbd.pid" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --log-error="$ROOT/log/mariadbd.log" >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --no-defaults -S "$DB_SOCKET" -uroot -e "select 1"
  mariadb --no-defaults -S "$DB_SOCKET" -uroot -e \
    "create user if not exists 'slurm'@'127.0.0.1' identified by '$DB_PASS';
     create user if not exists 'slurm'@'localhost' identified by '$DB_PASS';
     grant all on slurm_acct_db.* to 'slurm'@'127.0.0.1'; grant all on slurm_acct_db.* to 'slurm'@'localhost';"

  slurmdbd || fail "slurmdbd did not start"  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 60 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
  wait_for 60 "the accounting cluster entry" sacctmgr -i add cluster "$CLUSTER"
  slurmctld -c -f "$SLURM_CONF" || fail "slurmctld did not start"
  wait_for 60 slurmctld scontrol ping
  slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
  wait_for 60 "an idle node" bash -c "sinfo -h -o %T | grep -qE '^(idle|mixed)'"
  log "running: export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid NAME PIDFILE
  local pidfile=$2 pid deadline
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
  deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then log "$1 ignored SIGTERM: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    sleep 0.2
  done
  rm -f "$pidfile"
}

stop() {
  stop_pid slurmd "$ROOT/run/slurmd.pid"
  stop_pid slurmctld "$ROOT/run/slurmctld.pid"
  stop_pid slurmdbd "$ROOT/run/slurmdbd.pid"
  stop_pid mariadbd "$ROOT/run/mariadbd.pid"
  stop_pid munged "$ROOT/munge/munged.pid"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$ROOT/etc/slurm.conf" ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
