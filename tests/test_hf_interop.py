"""Hugging Face interop: weights in through initial_load_path under any layout, out through scripts/export_hf.py.

The reference is transformers itself (tiny random Qwen3 and Llama 3 saved by ``save_pretrained``);
without it the export -> import round trip still checks every layout bitwise.
"""

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from config.errors import CheckpointError, ConfigError
from models import Transformer, build_model_args
from models.args import RopeScaling
from models.flavors import LLAMA3_FLAVORS
from scripts.export_hf import main as export_hf
from scripts.export_hf import read_model
from tests.dist_utils import run_distributed
from tests.weights import loaded_parameters, refusal, whole_parameters
from train import train
from training.hf_checkpoint import INDEX, check_weight_files, read_hf_config, write_hf_folder
from training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 515
PP_VP = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.vocab_parallel", "--loss.name", "auto"]
# Llama 3.1's RoPE scaling, with an original context short enough that the debug flavor's 16-wide heads
# have frequencies in all three bands (kept, blended, divided by the factor).
SCALED_LLAMA = replace(LLAMA3_FLAVORS["debug"], rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))


def _argv(folder, name, steps, *extra):
    return [
        "--config",
        "configs/debug.toml",
        "--model.name",
        name,
        "--model.vocab_size",
        str(VOCAB),
        "--training.seq_len",
        "32",
        "--training.global_batch_size",
        "8",
        "--training.local_batch_size",
        "2",
        "--training.steps",
        str(steps),
        "--job.dump_folder",
        str(folder),
        *extra,
    ]


def _merged(per_rank: list[dict], tied: bool) -> dict[str, torch.Tensor]:
    """One name -> tensor map from all ranks; a tied head copy must equal the embedding, then is dropped."""
    merged = {k: v for rank in per_rank for k, v in rank.items()}
    if tied and "output.weight" in merged:
        assert torch.equal(merged.pop("output.weight"), merged["tok_embeddings.weight"])
    return merged


def _assert_bitwise(a: dict, b: dict, label: str):
    assert sorted(a) == sorted(b), label
    for name in a:
        assert torch.equal(a[name], b[name]), f"{label}: {name}"


# -- round trip, no transformers needed ---------------------------------------------------------------
def _train_export_import(rank, world_size, root):
    """Per model: train 2 steps, export to HF, import into a fresh single-process run; and a mismatched import."""
    out = {}
    for name in ("qwen3", "llama3"):
        source = train(load_recipe(_argv(root / f"{name}_source", name, 2, "--checkpoint.enable")))
        hf = root / f"{name}_hf"
        assert (
            export_hf(
                [
                    "--checkpoint",
                    str(root / f"{name}_source" / "checkpoint" / "step-2"),
                    "--config",
                    "configs/debug.toml",
                    "--model.name",
                    name,
                    "--model.vocab_size",
                    str(VOCAB),
                    "--output",
                    str(hf),
                ]
            )
            == 0
        )
        (imported,) = loaded_parameters(
            [_argv(root / f"{name}_single", name, 1, "--checkpoint.initial_load_path", str(hf))]
        )
        out[name] = (whole_parameters(source.model_parts), imported, sorted(p.name for p in hf.iterdir()))
    config_file = root / "qwen3_hf" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(
        json.dumps({**config, "num_hidden_layers": 3, "rms_norm_eps": 1e-5, "tie_word_embeddings": False})
    )
    out["mismatch"] = None
    try:
        train(
            load_recipe(_argv(root / "mismatch", "qwen3", 1, "--checkpoint.initial_load_path", str(root / "qwen3_hf")))
        )
    except CheckpointError as err:
        out["mismatch"] = str(err)
    config_file.write_text(json.dumps(config))
    return out


def _import_pipeline(rank, world_size, root):
    return loaded_parameters(
        [
            _argv(root / f"{name}_pp", name, 1, "--checkpoint.initial_load_path", str(root / f"{name}_hf"), *PP_VP)
            for name in ("qwen3", "llama3")
        ]
    )


@pytest.mark.multiprocess
def test_export_then_import_is_bitwise_in_every_layout(tmp_path):
    (out,) = run_distributed(_train_export_import, 1, tmp_path, timeout_s=300)
    for name, tied in (("qwen3", True), ("llama3", False)):
        trained, imported, files = out[name]
        assert files == ["config.json", "model.safetensors"]
        _assert_bitwise(_merged([trained], tied), _merged([imported], tied), f"{name} single process")
    for field in (
        "num_hidden_layers: folder 3 vs recipe 4",
        "rms_norm_eps: folder 1e-05 vs recipe 1e-06",
        "tie_word_embeddings: folder False vs recipe True",
    ):
        assert field in (out["mismatch"] or "no CheckpointError"), field

    # 2 pipeline stages x 2 FSDP shards, the vocab-parallel head a DTensor over the shards (a tied one a copy).
    per_rank = run_distributed(_import_pipeline, 4, tmp_path, timeout_s=300)
    for i, (name, tied) in enumerate((("qwen3", True), ("llama3", False))):
        _assert_bitwise(
            _merged([out[name][1]], tied), _merged([rank[i] for rank in per_rank], tied), f"{name} pp=2 x dp_shard=2"
        )


def _random_hf_folder(folder, dtype, max_shard_bytes):
    """Random debug-flavor weights written as a Hugging Face folder; returns them and the safetensors files."""
    args = build_model_args("qwen3", "debug", VOCAB)
    state = {name: torch.randn(p.shape) for name, p in Transformer(args).named_parameters()}
    return state, write_hf_folder(state, "qwen3", args, folder, dtype, max_shard_bytes)


SHARD_BYTES = 100_000  # several shards and an index for the debug flavor


def test_sharded_bfloat16_export(tmp_path):
    """A size limit splits the weights over several files with an index; bfloat16 halves them."""
    state, files = _random_hf_folder(tmp_path, torch.bfloat16, SHARD_BYTES)
    index = json.loads((tmp_path / INDEX).read_text())
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == 2 * sum(t.numel() for t in state.values())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


# -- folders that would mix weights of two exports ----------------------------------------------------------
def _add_stale_shard(folder):
    """A shard of an earlier export with more shards, next to this export's index."""
    stale = folder / "model-00001-of-00099.safetensors"
    shutil.copy(sorted(folder.glob("model-*.safetensors"))[0], stale)
    return [stale.name, f"not listed in {folder / INDEX}", "--replace"]


def _delete_a_shard(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return [shard.name, "is missing"]


def _misplace_a_tensor_in_the_index(folder):
    index = json.loads((folder / INDEX).read_text())
    files = list(index["weight_map"].values())
    name, file = next((n, f) for n, f in index["weight_map"].items() if files.count(f) > 1)  # still listed after
    other = next(f for f in files if f != file)
    index["weight_map"][name] = other
    (folder / INDEX).write_text(json.dumps(index))
    return [name, other, "does not hold it"]


def _copy_without_index(folder):
    shutil.copy(folder / "model.safetensors", folder / "model-old.safetensors")
    return ["model.safetensors", "model-old.safetensors", "--replace"]


FOLDER_DEFECTS = {  # name: (shards with an index, the defect: what the error must name)
    "stale_shard_next_to_an_index": (True, _add_stale_shard),
    "shard_missing": (True, _delete_a_shard),
    "index_names_another_file": (True, _misplace_a_tensor_in_the_index),
    "tensor_in_two_files_without_index": (False, _copy_without_index),
}


@pytest.mark.parametrize("defect", list(FOLDER_DEFECTS))
def test_a_folder_whose_files_disagree_is_refused_naming_them(defect, tmp_path):
    sharded, damage = FOLDER_DEFECTS[defect]
    _random_hf_folder(tmp_path, torch.float32, SHARD_BYTES if sharded else 2**30)
    assert (tmp_path / INDEX).is_file() == sharded
    check_weight_files(tmp_path)  # the intact folder passes
    names = damage(tmp_path)
    with pytest.raises(CheckpointError) as err:
        check_weight_files(tmp_path)
    assert "\n" not in str(err.value) and all(name in str(err.value) for name in names), str(err.value)


@pytest.mark.parametrize(
    "text, problem", [('{"hidden_size": 64,', "is not valid JSON"), ("[64, 4]", "holds an array, not a JSON object")]
)
def test_a_damaged_config_json_is_named(text, problem, tmp_path):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'config.json'} {problem}.*; download or export"):
        read_hf_config(tmp_path)


def _snapshot(folder):
    """Every file under ``folder``, hidden ones included, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _a_run(tmp_path):
    """A run's dump folder with a checkpoint step-10 (stand-in files: a refusal must come before any is read)."""
    step = tmp_path / "run" / "checkpoint" / "step-10"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"not read")
    (tmp_path / "run" / "config.toml").write_text((ROOT / "configs" / "debug.toml").read_text())
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 10}\n')


def _export_into(tmp_path, output, *extra):
    run = tmp_path / "run"
    argv = ["--checkpoint", str(run / "checkpoint" / "step-10"), "--config", str(run / "config.toml")]
    return export_hf([*argv, "--output", output, *extra])


def _earlier_export(folder, *added):
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", *added):
        (folder / name).write_text(name)


OUTPUT_REFUSALS = {  # name: (what is in tmp_path besides the run, --output relative to tmp_path, the error says)
    "the_run_folder": (lambda t: None, "run", "run holds the checkpoint ({t}/run/checkpoint/step-10), which an export"),
    "the_checkpoint_folder": (lambda t: None, "run/checkpoint", "run/checkpoint holds the checkpoint"),
    "the_checkpoint": (lambda t: None, "run/checkpoint/step-10", "run/checkpoint/step-10 is the checkpoint"),
    "the_current_folder": (lambda t: (t / "cwd").mkdir(), ".", ". is the current folder ({t}/cwd)"),
    "a_folder_holding_it": (lambda t: (t / "home" / "cwd").mkdir(parents=True), "..", ".. holds the current folder"),
    "an_export_with_a_tokenizer_added": (
        lambda t: _earlier_export(t / "hf", "tokenizer.json"),
        "hf",
        "hf holds tokenizer.json, which is no export of export_hf (config.json + model*.safetensors alone)",
    ),
    "weights_of_unknown_origin": (
        lambda t: (t / "hf").mkdir() or (t / "hf" / "model.safetensors").write_text("?"),
        "hf",
        "hf holds model.safetensors, which is no export of export_hf",
    ),
    "a_partial_folder_that_is_no_export": (
        lambda t: (t / "hf.partial").mkdir() or (t / "hf.partial" / "notes.txt").write_text("mine"),
        "hf",
        "hf.partial exists and is not what an unfinished export leaves, so it is kept",
    ),
}


@pytest.mark.parametrize("case", list(OUTPUT_REFUSALS))
def test_export_never_replaces_what_it_did_not_write(case, tmp_path, capsys, monkeypatch):
    """Even with --replace, refused before anything is read, in one line that names what is there."""
    prepare, output, says = OUTPUT_REFUSALS[case]
    _a_run(tmp_path)
    prepare(tmp_path)
    monkeypatch.chdir(next(tmp_path.glob("**/cwd"), tmp_path))
    before = _snapshot(tmp_path)
    assert _export_into(tmp_path, output, "--replace") == 2
    err = capsys.readouterr().err
    assert err.startswith("export_hf: config error: --output: ") and err.count("\n") == 1, err
    assert says.format(t=tmp_path) in err, err
    assert _snapshot(tmp_path) == before


def test_export_replaces_an_earlier_export_only_when_told(tmp_path, capsys):
    _a_run(tmp_path)
    _earlier_export(tmp_path / "hf")
    before = _snapshot(tmp_path / "hf")
    assert _export_into(tmp_path, str(tmp_path / "hf")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf holds an earlier export; pass --replace to replace it whole" in err
    assert _snapshot(tmp_path / "hf") == before


def _truncate(step, name):
    file = step / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return f"{name}: truncated" if name != ".metadata" else ".metadata: cannot be read"


@pytest.mark.parametrize(
    "mistake",
    ["folder_of_the_run's_checkpoints", "data_file_truncated", "metadata_truncated", "shard_size_0", "shard_size_-1"],
)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in this one process, as meant
def test_checkpoint_and_flag_mistakes_are_one_line_naming_the_fix(mistake, tmp_path, capsys, caplog):
    run = tmp_path / "run" / "checkpoint"
    for step in (3, 10):  # a real DCP checkpoint of something; only its files' state matters here
        dcp.save({"x": torch.arange(4096.0)}, checkpoint_id=str(run / f"step-{step}"))
    argv, says = ["--checkpoint", str(run / "step-10")], None
    if mistake.startswith("folder"):
        argv = ["--checkpoint", str(run)]
        says = f"{run} holds checkpoints, one per step-N folder; pass one, e.g. --checkpoint {run / 'step-10'}"
    elif mistake.endswith("truncated"):
        damage = _truncate(run / "step-10", ".metadata" if mistake == "metadata_truncated" else "__0_0.distcp")
        says = f"{run / 'step-10'} is damaged ({damage}"
    else:
        size = mistake.removeprefix("shard_size_")
        argv += ["--max_shard_gib", size]
        says = f"config error: --max_shard_gib: {size} is no file size; give one above 0, e.g. 5"
    assert export_hf([*argv, "--config", "configs/debug.toml", "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export_hf: ") and err.count("\n") == 1 and says in err, err
    if mistake.endswith("truncated"):
        assert err.endswith("; export another step-N folder of the run, or copy this one again\n")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not (tmp_path / "hf").exists()


def _export_twice_then_import(rank, world_size, root):
    """Export step 1 (sharded, with an index), then step 2 over it with --replace (one file) and import that;
    then put the first export's files back beside it, and then damage config.json: both imports must fail."""
    run, out, first = root / "run", root / "hf", root / "first"

    def export(step, *extra):
        return export_hf(
            [
                "--checkpoint",
                str(run / "checkpoint" / f"step-{step}"),
                "--config",
                "configs/debug.toml",
                "--model.vocab_size",
                str(VOCAB),
                "--output",
                str(out),
                *extra,
            ]
        )

    train(load_recipe(_argv(run, "qwen3", 2, "--checkpoint.enable", "--checkpoint.interval", "1")))
    assert export(1, "--max_shard_gib", str(SHARD_BYTES / 2**30)) == 0
    shutil.copytree(out, first)
    assert export(2, "--replace") == 0
    run_files = _snapshot(run)
    step = str(run / "checkpoint" / "step-2")
    into_the_run = export_hf(
        ["--checkpoint", step, "--config", str(run / "config.toml"), "--output", str(run), "--replace"]
    )
    run_kept = _snapshot(run) == run_files
    result = {
        "into_the_run": into_the_run,
        "run_kept": run_kept,
        "files": sorted(p.name for p in root.iterdir()),
        "exported": sorted(p.name for p in out.iterdir()),
        "step1": read_model(run / "checkpoint" / "step-1", None),
        "step2": read_model(run / "checkpoint" / "step-2", None),
    }
    argv = _argv(root / "import", "qwen3", 1, "--checkpoint.initial_load_path", str(out))
    (result["imported"],) = loaded_parameters([argv])
    for file in first.iterdir():  # what an export into the non-empty folder used to leave
        if file.name != "config.json":
            shutil.copy(file, out / file.name)
    result["mixed"] = refusal(argv)
    (out / "config.json").write_text("[]")
    result["config"] = refusal(argv)
    return result


@pytest.mark.multiprocess
def test_an_export_with_replace_replaces_the_folder_whole(tmp_path):
    (out,) = run_distributed(_export_twice_then_import, 1, tmp_path, timeout_s=300)
    assert out["files"] == ["first", "hf", "run"]  # no .partial or .replaced folder left
    assert out["into_the_run"] == 2 and out["run_kept"]  # the run it exports from is no earlier export
    assert out["exported"] == ["config.json", "model.safetensors"]
    imported = _merged([out["imported"]], tied=True)
    _assert_bitwise(out["step2"], imported, "import of the second export")
    assert any(not torch.equal(out["step1"][name], imported[name]) for name in imported)  # the steps differ
    assert f"{tmp_path / 'hf' / 'model.safetensors'} is not listed in {tmp_path / 'hf' / INDEX}" in out["mixed"]
    assert f"{tmp_path / 'hf' / 'config.json'} holds an array, not a JSON object" in out["config"]


def test_initial_load_path_is_checked_when_the_recipe_loads(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.initial_load_path: .* is neither a checkpoint folder"):
        load_recipe(_argv(tmp_path, "qwen3", 1, "--checkpoint.initial_load_path", str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="checkpoint.initial_load_model_only: .* Hugging Face folder"):
        load_recipe(
            _argv(
                tmp_path,
                "qwen3",
                1,
                "--checkpoint.initial_load_path",
                str(tmp_path),
                "--checkpoint.initial_load_model_only",
                "false",
            )
        )


# -- transformers as the reference ------------------------------------------------------------------
def _hf_reference(transformers, name: str, folder):
    """A tiny random transformers model with our debug flavor's sizes, saved as safetensors."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    if name == "qwen3":
        config = transformers.Qwen3Config(**common, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        scaling = {"rope_type": "llama3", **asdict(SCALED_LLAMA.rope_scaling)}  # the same four field names
        config = transformers.LlamaConfig(
            **common, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_scaling=scaling
        )
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():  # every weight random, norms included, so a swapped name cannot go unnoticed
        for param_name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in param_name else 0.05 * torch.randn_like(param))
    model.float().eval().save_pretrained(folder, safe_serialization=True)
    return model


def _import_references(rank, world_size, root):
    """Both references through initial_load_path; the Llama one has RoPE scaling, so its flavor must too."""
    LLAMA3_FLAVORS["debug"] = SCALED_LLAMA
    return loaded_parameters(
        [
            _argv(root / f"{name}_run", name, 1, "--checkpoint.initial_load_path", str(root / name))
            for name in ("qwen3", "llama3")
        ]
    )


@pytest.mark.multiprocess
def test_logits_match_transformers_and_the_export_loads_in_it(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    references = {name: _hf_reference(transformers, name, tmp_path / name) for name in ("qwen3", "llama3")}
    (loaded,) = run_distributed(_import_references, 1, tmp_path, timeout_s=300)
    monkeypatch.setitem(LLAMA3_FLAVORS, "debug", SCALED_LLAMA)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    for (name, reference), weights in zip(references.items(), loaded, strict=True):
        args = build_model_args(name, "debug", VOCAB)
        ours = Transformer(replace(args, max_seq_len=32))
        with torch.no_grad():
            for param_name, param in ours.named_parameters():
                param.copy_(weights[param_name])
            expected = reference(tokens).logits
            torch.testing.assert_close(ours.forward_logits(tokens), expected, rtol=0, atol=1e-5, msg=name)
            # What the export writes (config.json, several shards and their index) is what transformers reads.
            write_hf_folder(
                dict(ours.named_parameters()),
                name,
                args,
                tmp_path / f"{name}_out",
                torch.float32,
                max_shard_bytes=200_000,
            )
            exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_out")
            assert type(exported) is type(reference)
            torch.testing.assert_close(exported(tokens).logits, expected, rtol=0, atol=1e-5, msg=name)
