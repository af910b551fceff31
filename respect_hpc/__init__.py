"""respect-hpc: retrospective learning from interactions (ReSpect) as batch jobs on SLURM clusters."""

__version__ = "0.1.0"
