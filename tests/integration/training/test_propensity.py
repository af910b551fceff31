"""p recomputed where the logs lack it (data.propensity: recompute), under each deployed policy's adapter."""

import polars as pl
import pytest
import torch
from conftest import round_inputs

import jobs.ingest
from respect_hpc.config.loading import load_manifest
from respect_hpc.data.logs import IngestError


def test_p_is_recomputed_under_the_deployed_adapter_where_the_logs_lack_it(tmp_path, taught_decoder):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from respect_hpc.data.datasets import with_history
    from respect_hpc.data.logs import ingest
    from respect_hpc.domain.prompts import policy_template
    from respect_hpc.model.loading import load_encoder, load_policy
    from respect_hpc.model.policy_inputs import policy_view

    inputs = round_inputs(tmp_path, games=6, model=taught_decoder[0])
    logs = pl.read_parquet(inputs["logs"])
    logs = logs.with_columns(prob_action=pl.when(pl.int_range(pl.len()) % 2 == 0).then(None)
                             .otherwise(pl.col("prob_action")))  # every other game lost its p
    logs.write_parquet(tmp_path / "unlogged.parquet")
    adapter = tmp_path / "sft-adapter"
    policy = load_policy(load_manifest_model(inputs), r=8, alpha=8, dropout=0.0, placement="paper", seed=3)
    for name, p in policy.named_parameters():  # a trained-looking adapter: B away from zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    policy.save_pretrained(adapter)
    manifest = tmp_path / "round.yaml"
    manifest.write_text(f"experiment: p\nround: 1\nworkdir: {tmp_path / 'runs'}\n"
                        f"data: {{interactions: [{tmp_path / 'unlogged.parquet'}], images: {inputs['images']}, "
                        f"propensity: recompute, deployed: {{sft: {adapter}}}}}\n"
                        f"model: {{path: {inputs['model']}, dtype: fp32}}\n"
                        "variants: [{name: b-rl, feedback: binary, objective: rl}]\n")
    m = load_manifest(manifest)
    jobs.ingest.run(m)
    turns = pl.read_parquet(tmp_path / "runs" / "p" / "data" / "turns.parquet")
    logged = ingest([inputs["logs"]]).turns.select("game_turn_id", logged="prob_action")
    acting = turns.filter(pl.col("action") != "").join(logged, on="game_turn_id")
    assert acting["prob_action"].is_not_null().all()
    with_p = logs.filter(pl.col("prob_action").is_not_null())["game_id"].to_list()
    kept = acting.filter(pl.col("game_id").is_in(with_p))
    assert kept.height and (kept["prob_action"] == kept["logged"]).all()  # logged p is kept as it was
    # one recomputed p, by hand: a full forward pass of base + adapter, product of the answer tokens' probabilities
    row = with_history(turns).join(acting.filter(pl.col("prob_action") != pl.col("logged")).head(1),
                                   on="game_turn_id", how="semi").row(0, named=True)
    encoder = load_encoder(m.model, m.data.images)
    item = encoder.encode(policy_view(row, policy_template(m.policy_template)))
    batch = encoder.collate([item])
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(m.model.path), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"]).logits
    (_, n), = item.answers
    probs = torch.softmax(logits[0, -n - 1:-1], -1).gather(-1, torch.tensor(item.input_ids[-n:]).unsqueeze(-1))
    assert row["prob_action"] == pytest.approx(probs.prod().item(), rel=1e-4)

    manifest.write_text(manifest.read_text().replace("deployed: {sft:", "deployed: {bp:"))
    with pytest.raises(IngestError, match=r"data.deployed: no adapter for policy sft, whose logged turns have no p"):
        jobs.ingest.run(load_manifest(manifest))
    manifest.write_text(manifest.read_text().replace("propensity: recompute", "propensity: logged"))
    with pytest.raises(IngestError, match=r"data.propensity: \d+ actions that variant b-rl \(rl\) trains on have no p "
                                          r"\(e.g. .* of policy sft\): set data.propensity: recompute"):
        jobs.ingest.run(load_manifest(manifest))


def load_manifest_model(inputs):
    from respect_hpc.config.schema import ModelSection

    return ModelSection(path=inputs["model"], dtype="fp32")
