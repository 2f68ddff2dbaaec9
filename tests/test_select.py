"""Best step per subject: evaluate while training, publish the best step by the rule, stop early."""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from helpers import fast_config, picture
from safetensors.torch import load_file

from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import ExpertInfo
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import train_packed, train_subject

LORA = "pytorch_lora_weights.safetensors"


def subject(i: int = 0) -> SubjectData:
    return SubjectData(f"sel{i}", "dog", [picture(300 + 10 * i + j) for j in range(3)],
                       prompts=["a {0} {1}", "a {0} {1} on the beach"])


def config(**kw):
    base = dict(with_prior_preservation=False, select_images=1, select_inference_steps=2, steps=6, select_every=2,
                select_scorer="helpers:ScriptedScorer")
    return fast_config(**{**base, **kw})


def script(subject_scores, prompt_scores):
    helpers.SCRIPT["subject"][:] = subject_scores
    helpers.SCRIPT["prompt"][:] = prompt_scores


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a / LORA)), load_file(str(b / LORA))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_best_qualifying_step_is_published_and_recorded(tmp_path):
    # base, then steps 2, 4, 6: step 6 has the highest subject score but its prompt fidelity
    # (0.5 of the base's) is under the 0.85 bar, so step 4 is published.
    script([0.1, 0.3, 0.6, 0.9], [1.0, 0.95, 0.9, 0.5])
    cache = ClassImageCache(tmp_path / "c")
    tb = tmp_path / "tb"
    r = train_subject(subject(), "tiny-random", config(tensorboard_dir=str(tb)), tmp_path / "sel", class_cache=cache,
                      progress=False)
    sel = ExpertInfo.read(tmp_path / "sel").selection
    assert sel["chosen_step"] == 4 and not sel["fallback"] and not sel["stopped_early"]
    assert sel["base"]["step"] == 0 and sel["base"]["prompt"] == 1.0
    assert [(s["step"], s["subject"], s["qualifies"]) for s in sel["scores"]] == [(2, 0.3, True), (4, 0.6, True),
                                                                                 (6, 0.9, False)]
    assert sel["prompts"] == ["a {0} {1}", "a {0} {1} on the beach"] and "0.85 of the base" in sel["rule"]
    assert r.loop.final_step == 6 and helpers.SCRIPT["subject"] == []
    # The published weights are step 4's: those of a plain 4-step run, bit for bit.
    plain = train_subject(subject(), "tiny-random", fast_config(with_prior_preservation=False, steps=4),
                          tmp_path / "plain4", class_cache=cache, progress=False)
    assert same_weights(tmp_path / "sel", plain.expert_dir)
    # The scores also went to TensorBoard.
    from test_train_options import _scalars

    got = _scalars(tb / "sel0")
    assert [(step, round(v, 3)) for step, v in got["eval/subject"]] == [(2, 0.3), (4, 0.6), (6, 0.9)]
    assert len(got["train/loss"]) == 6


def test_early_stop_ends_training_and_publishes_the_best(tmp_path):
    # best at step 2, then two evaluations without improvement: with patience 2 training ends at step 6 of 12.
    script([0.1, 0.5, 0.4, 0.45, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0])
    cache = ClassImageCache(tmp_path / "c")
    r = train_subject(subject(), "tiny-random", config(steps=12, select_patience=2), tmp_path / "sel",
                      class_cache=cache, progress=False)
    sel = r.info.selection
    assert r.loop.final_step == 6 and sel["stopped_early"] and sel["chosen_step"] == 2
    assert [s["step"] for s in sel["scores"]] == [2, 4, 6] and helpers.SCRIPT["subject"] == [0.9]
    plain = train_subject(subject(), "tiny-random", fast_config(with_prior_preservation=False, steps=2),
                          tmp_path / "plain2", class_cache=cache, progress=False)
    assert same_weights(r.expert_dir, plain.expert_dir)


def test_no_qualifying_step_falls_back_to_the_best_prompt_fidelity(tmp_path):
    script([0.1, 0.3, 0.6, 0.9], [1.0, 0.8, 0.7, 0.5])
    r = train_subject(subject(), "tiny-random", config(), tmp_path / "sel", class_cache=ClassImageCache(tmp_path / "c"),
                      progress=False)
    assert r.info.selection["chosen_step"] == 2 and r.info.selection["fallback"]


def test_a_resumed_run_chooses_as_the_uninterrupted_one(tmp_path):
    cache = ClassImageCache(tmp_path / "c")
    cfg = config(steps=8, checkpoint_every=2, select_scorer="helpers:PixelScorer")
    whole = train_subject(subject(), "tiny-random", cfg, tmp_path / "whole", class_cache=cache, progress=False)

    def crash(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_subject(subject(), "tiny-random", cfg, tmp_path / "again", class_cache=cache, progress=False,
                      on_step=crash)
    again = train_subject(subject(), "tiny-random", cfg, tmp_path / "again", class_cache=cache, progress=False)
    assert again.loop.resumed_from == 4

    def scores(sel):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in [sel["base"], *sel["scores"]]]

    a, b = whole.info.selection, again.info.selection
    assert scores(a) == scores(b) and a["chosen_step"] == b["chosen_step"]
    assert same_weights(whole.expert_dir, again.expert_dir)


def test_selection_is_refused_where_it_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="needs select_scorer"):
        fast_config(select_every=2)
    with pytest.raises(ConfigError, match="set select_every too"):
        fast_config(select_patience=2)
    with pytest.raises(ConfigError, match=r"unknown select_scorer 'judge'.*installed: dino, toy"):
        train_subject(subject(), "tiny-random", config(select_scorer="judge"), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="--select-dino-model"):
        train_subject(subject(), "tiny-random", config(select_scorer="dino"), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match=r"sel0, sel1.*--pack 1"):
        train_packed([subject(0), subject(1)], "tiny-random", [config(seed=s) for s in (0, 1)],
                     [tmp_path / "a", tmp_path / "b"], progress=False)


def test_the_toy_judge_scores_a_toy_expert(tmp_path):
    """The shipped scorer on the toy world: the base model draws no subject, prompt fidelity is the judge's."""
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.toy.subjects import write_subjects_manifest

    write_subjects_manifest(tmp_path / "m")
    m = Manifest.open(tmp_path / "m")
    rec = m.record("ball-halves")
    s = SubjectData("ball-halves", rec.class_noun, [im for _, im, _ in m.read_images("ball-halves")],
                    prompts=list(rec.eval_prompts)[:2])
    cfg = config(select_scorer="toy", steps=4, learning_rate=3e-4, method="full", select_guidance_scale=4.0)
    r = train_subject(s, "toy", cfg, tmp_path / "e", progress=False)
    sel = r.info.selection
    assert sel["scorer"] == "toy" and sel["chosen_step"] in (2, 4)
    assert 0 < sel["base"]["prompt"] <= 1 and -1 <= sel["base"]["subject"] <= 1
    assert all(0 < s["prompt"] <= 1 for s in sel["scores"])
    json.dumps(sel)  # what the registry and the dashboard read


def test_mlflow_gets_each_subjects_config_losses_and_scores(tmp_path):
    """``--mlflow-tracking-uri`` (a local file store here): a run per subject with the resolved
    config as parameters, the loop's losses per step and the selection scores."""
    from mlflow.tracking import MlflowClient

    script([0.1, 0.3, 0.6, 0.9], [1.0, 0.95, 0.9, 0.5])
    uri = (tmp_path / "mlruns").as_uri()
    r = train_subject(subject(), "tiny-random", config(mlflow_tracking_uri=uri, mlflow_experiment="dogs"),
                      tmp_path / "sel", class_cache=ClassImageCache(tmp_path / "c"), progress=False)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dogs").experiment_id])
    assert run.info.run_name == "sel0" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["select_every"] == "2"
    assert run.data.tags["dreamfleet.subject"] == "sel0"
    losses = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(losses) == [(h["step"], pytest.approx(h["loss"])) for h in r.loop.history]
    scores = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/subject"))
    assert scores == [(2, 0.3), (4, 0.6), (6, 0.9)]


def wandb_records(path) -> list:
    """The protobuf records of a W&B offline run file (``run-<id>.wandb``): a 7-byte ``:W&B``
    header, then LevelDB-log framing in 32 KiB blocks (7-byte chunk headers: CRC, length, type
    full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, buf = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
    return records


def test_wandb_gets_each_subjects_config_losses_and_scores(tmp_path, monkeypatch):
    """``--wandb-project`` with W&B in offline mode: a run per subject with the resolved config,
    the loop's losses per step and the selection scores, read back from the run's file."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    script([0.1, 0.3, 0.6, 0.9], [1.0, 0.95, 0.9, 0.5])
    r = train_subject(subject(), "tiny-random", config(wandb_project="dogs"), tmp_path / "sel",
                      class_cache=ClassImageCache(tmp_path / "c"), progress=False)
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    run = next(x.run for x in records if x.WhichOneof("record_type") == "run")
    params = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.project == "dogs" and run.display_name == "sel0" and params["learning_rate"] == 0.001
    history: dict[str, list] = {}
    for x in records:
        if x.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in x.history.item}
            for key in ("train/loss", "eval/subject"):
                if key in items:
                    history.setdefault(key, []).append((items["_step"], items[key]))
    assert history["train/loss"] == [(h["step"], pytest.approx(h["loss"])) for h in r.loop.history]
    assert history["eval/subject"] == [(2, 0.3), (4, 0.6), (6, 0.9)]
