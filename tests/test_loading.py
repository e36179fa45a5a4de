"""One loading path with clear failures: a model whose weights cannot load (a truncated or corrupt file,
shapes that disagree with the config, a missing shard or tensor) is refused by every command with a
one-line error that names the file and the reason, exit code 2, before anything is written."""

import json

import pytest
import yaml
from safetensors.torch import save_file
from tiny import char_tokenizer, tiny_model

from transact.cli import main
from transact.errors import TransactError
from transact.io.models import check_weight_files, load_config, prepare_model, resolve_source


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good"
    tiny_model("llama", heads=4, kv_heads=2).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def truncated(good, tmp_path):
    bad = _copy(good, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return bad


def _error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def _commands(model, tmp_path, plan):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model), "out": str(tmp_path / "run"), "device": "cpu",
                                      "target": {"heads": 2}, "training": {"tokens_per_shot": 0}}))
    return {
        "prune": ["prune", str(model), "--out", str(tmp_path / "pruned"), "--heads", "2", "--metric", "magnitude"],
        "apply-plan": ["apply-plan", str(model), str(plan), "--out", str(tmp_path / "applied")],
        "eval": ["eval", str(model), "--json", str(tmp_path / "eval.json")],
        "bench": ["bench", str(model), "--out", str(tmp_path / "bench")],
        "compare": ["compare", str(model), str(model), "--out", str(tmp_path / "compare")],
        "export": ["export", str(model), "--gguf", str(tmp_path / "model.gguf")],
        "run": ["run", str(recipe), "--quiet"],
        "info": ["info", str(model)],
    }


def test_every_command_refuses_a_truncated_checkpoint(tmp_path, good, truncated, capsys):
    assert main(["prune", str(good), "--out", str(tmp_path / "plan_src"), "--heads", "2", "--metric", "magnitude",
                 "--quiet"]) == 0
    plan = tmp_path / "plan_src" / "plan.json"
    before = set(tmp_path.iterdir())
    for name, argv in _commands(truncated, tmp_path, plan).items():
        err = _error_of(capsys, argv)
        assert f"{truncated / 'model.safetensors'} is truncated" in err, (name, err)
    assert set(tmp_path.iterdir()) == before | {tmp_path / "run.yaml"}  # nothing written by any command


def test_shapes_that_disagree_with_the_config(good, tmp_path, capsys):
    bad = _copy(good, tmp_path / "reshaped")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"intermediate_size": 80}))
    err = _error_of(capsys, ["eval", str(bad)])
    assert "model.layers.0.mlp.down_proj.weight has shape [64, 96] but the config implies [64, 80]" in err
    assert str(bad / "model.safetensors") in err


def test_missing_shard_and_missing_tensor(good, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    tiny_model("qwen2", heads=4, kv_heads=2).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    check_weight_files(resolve_source(sharded), load_config(resolve_source(sharded)))  # complete: accepted
    shards[1].unlink()
    err = _error_of(capsys, ["prune", str(sharded), "--out", str(tmp_path / "o"), "--heads", "2", "--metric",
                             "magnitude"])
    assert f"{shards[1]}" in err and "listed in model.safetensors.index.json is missing" in err

    partial = _copy(good, tmp_path / "partial")
    from safetensors.torch import load_file

    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TransactError, match=r"no weight file holds model\.layers\.1\.self_attn\.k_proj\.weight"):
        prepare_model(str(partial))


def test_not_a_safetensors_file_and_tied_embeddings(tmp_path, capsys):
    tied = tmp_path / "tied"
    tiny_model("qwen3", tie=True).save_pretrained(tied)  # lm_head.weight is not in the file: it is the embedding
    assert prepare_model(str(tied)).shape.num_heads == 4
    (tied / "model.safetensors").write_bytes(b"\xff" * 64)
    err = _error_of(capsys, ["info", str(tied)])
    assert str(tied / "model.safetensors") in err and "not a valid safetensors file" in err


def test_a_load_failure_after_the_checks_is_still_one_line(good, monkeypatch, capsys, tmp_path):
    """Whatever the checks cannot see, a failure inside transformers' loader is still a clear error."""
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict\n  details on a second line")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    err = _error_of(capsys, ["eval", str(good)])
    assert err == f"transact: error: could not load {str(good)!r}: Error(s) in loading state_dict"
