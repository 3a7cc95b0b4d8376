"""Configs: every shipped file validates; mistakes are errors that name the file and the key."""

from pathlib import Path

import pytest

from harness import config

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "default.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = config.load(path)
    assert cfg.prompts.is_file()
    assert len({m.name for m in cfg.models}) == len(cfg.models)


def _write(tmp_path, text):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "text": "hello there"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
reference: {name: ref, source: zoo:tiny-qwen1.5-s-chat}
variants: [{name: v, source: zoo:tiny-qwen1.5-s}]
prompts: p.jsonl
"""


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, BASE + "batch_sise: 4\n")
    with pytest.raises(config.ConfigError, match=r"c\.yaml.*unknown key 'batch_sise'"):
        config.load(path)


def test_unknown_nested_key(tmp_path):
    path = _write(tmp_path, BASE.replace("source: zoo:tiny-qwen1.5-s}", "source: zoo:tiny-qwen1.5-s, dtyp: float16}"))
    with pytest.raises(config.ConfigError, match=r"unknown key 'variants\.0\.dtyp'"):
        config.load(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("batch_sise: 4", r"unknown key 'batch_sise' \(did you mean 'batch_size'\?\); the top-level keys are: name, zoo_profile, "),
        ("metrics: {topk: [5]}", r"unknown key 'metrics\.topk' \(did you mean 'top_k'\?\); the keys of 'metrics' are: top_k, "
                                 r"bootstrap_resamples, matrix, smoothing_eps\.$"),
        ("text: {windows: 3}", r"unknown key 'text\.windows'; the keys of 'text' are: context, score\.$"),
        ("generate: {max_new_token: 64}", r"unknown key 'generate\.max_new_token' \(did you mean 'max_new_tokens'\?\)"),
        ("gate: {v: {kl_mean: {maxx: 0.01}}}", r"'gate\.v\.kl_mean\.maxx' \(did you mean 'max'\?\); the keys of "
                                               r"'gate\.v\.kl_mean' are: min, max, max_x_floor\.$"),
    ],
)  # fmt: skip
def test_unknown_key_lists_the_keys_of_its_place(tmp_path, extra, message):
    """A typo's message names the keys valid where it stands (the nested model's, not the top level's) and the
    closest of them; `source_file`, set by load, is not offered."""
    with pytest.raises(config.ConfigError, match=message) as err:
        config.load(_write(tmp_path, BASE + extra + "\n"))
    assert "source_file" not in str(err.value)
    with pytest.raises(config.ConfigError, match=r"'variants\.0\.dtyp' \(did you mean 'dtype'\?\); the keys of 'variants\.0' are"):
        config.load(_write(tmp_path, BASE), ["variants.0.dtyp=float16"])
    with pytest.raises(config.ConfigError, match=r"variants\.1 is not an index of a 1-item list"):
        config.load(_write(tmp_path, BASE), ["variants.1.dtype=float16"])


def test_wrong_value_names_key(tmp_path):
    path = _write(tmp_path, BASE + "batch_size: many\n")
    with pytest.raises(config.ConfigError, match=r"key 'batch_size'.*'many'"):
        config.load(path)


def test_missing_prompt_file(tmp_path):
    path = _write(tmp_path, BASE.replace("p.jsonl", "nope.jsonl"))
    with pytest.raises(config.ConfigError, match=r"key 'prompts'.*nope\.jsonl does not exist"):
        config.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.yaml")
    with pytest.raises(config.ConfigError, match="is a folder, not a file"):
        config.load(tmp_path)
    path = _write(tmp_path, BASE.replace("p.jsonl", "."))
    with pytest.raises(config.ConfigError, match=r"key 'prompts': prompt file .* is a folder, not a file"):
        config.load(path)


def test_a_config_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b"name: caf\xe9\n")
    with pytest.raises(config.ConfigError, match=r"latin1\.yaml is not UTF-8 text \(byte \d+: invalid continuation byte\)"):
        config.load(path)


def test_a_bad_override_value_names_the_override(tmp_path):
    """A value the file did not hold is not blamed on the file alone: the override that set it is named."""
    path = _write(tmp_path, BASE)
    with pytest.raises(config.ConfigError, match=r"key 'batch_size' \(from the override 'batch_size=-1'\): Input should be"):
        config.load(path, ["batch_size=-1"])
    with pytest.raises(config.ConfigError, match=r"unknown key 'metrics.top_kk'.* \(from the override 'metrics.top_kk=3'\)"):
        config.load(path, ["metrics.top_kk=3"])
    # a check across keys (a name that must be a variant's) names the override its message is about
    with pytest.raises(config.ConfigError, match=r"noise_floor 'vv' is not the name of a variant .* \(from the override 'noise_floor=vv'\)\.$"):
        config.load(path, ["noise_floor=vv"])
    with pytest.raises(config.ConfigError, match=r"gate key 'w' .* \(from the override 'gate\.w=\{kl_mean: \{max: 1\}\}'\)\.$"):
        config.load(path, ["gate.w={kl_mean: {max: 1}}"])
    with pytest.raises(config.ConfigError, match=r"gate key 'w' is not the name of a variant \(nor '\*', every variant\); the variants are: v\.$"):
        config.load(_write(tmp_path, BASE + "gate: {w: {kl_mean: {max: 1}}}\n"), ["batch_size=2"])  # the file's: no override named


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = config.load(path, ["batch_size=3", "variants.0.dtype=bfloat16", "reference.trust_remote_code=true"])
    assert cfg.batch_size == 3 and cfg.variants[0].dtype == "bfloat16" and cfg.reference.trust_remote_code is True
    with pytest.raises(config.ConfigError, match="variants.5"):
        config.load(path, ["variants.5.dtype=float16"])
    with pytest.raises(config.ConfigError, match="KEY=VALUE"):
        config.load(path, ["batch_size"])
    with pytest.raises(config.ConfigError, match="unknown key 'bogus'"):
        config.load(path, ["bogus=1"])


@pytest.mark.parametrize(
    "extra, message",
    [
        ("metrics: {top_k: [5, 300]}", r"key 'metrics\.top_k\.1': Input should be less than or equal to 256"),
        ("metrics: {top_k: [0]}", r"key 'metrics\.top_k\.0': Input should be greater than or equal to 1"),
        ("metrics: {top_k: [5, 5]}", r"key 'metrics\.top_k': each k once"),
        ("seed: 1\nseed: 2", r"c\.yaml is not valid YAML: key 'seed' is given twice in one mapping"),
        ("metrics: {matrix: true, matrix: false}", r"key 'matrix' is given twice"),
        # ε = 1 mixes q away entirely (log1p(−1) = −inf: every smoothed KL is KL against the uniform row); ε > 1 is NaN
        ("metrics: {smoothing_eps: 1.0}", r"key 'metrics\.smoothing_eps': Input should be less than 1"),
        ("metrics: {smoothing_eps: 0}", r"key 'metrics\.smoothing_eps': Input should be greater than 0"),
        # a one-token window predicts nothing: a run of zero positions
        ("text: {context: 1}", r"key 'text\.context': Input should be greater than or equal to 2"),
        # llama_cpp scores a window's second half less its first token: none of a 2-token window (it said "no prompt
        # has that many" tokens, whatever their length)
        ("text: {context: 2, score: llama_cpp}", r"key 'text': text\.score 'llama_cpp' .* it needs text\.context >= 3"),
        # numpy's generators take non-negative seeds only: the bootstrap failed after every model had run
        ("seed: -1", r"key 'seed': Input should be greater than or equal to 0"),
        # a floor multiple of 0 (or below) fails every pair whatever its drift
        ("noise_floor: v\ngate: {v: {kl_mean: {max_x_floor: 0}}}", r"key 'gate\.v\.kl_mean\.max_x_floor': Input should be greater than 0"),
    ],
)  # fmt: skip
def test_bad_metrics_and_repeated_keys_fail_at_load(tmp_path, extra, message):
    """Before any model loads: a top-k the kernel cannot take, a key whose first value would be silently lost, or a
    setting that makes no sense."""
    with pytest.raises(config.ConfigError, match=message):
        config.load(_write(tmp_path, BASE + extra + "\n"))


def test_anchors_and_merge_keys_still_load(tmp_path):
    """The repeated-key check leaves YAML's own sharing alone: an anchor, an alias, and a merge key overridden."""
    text = BASE + "metrics: &m {top_k: [5], matrix: false}\ngate: {v: {kl_mean: {<<: {max: 0.5, min: 0}, max: 0.01}}}\n"
    cfg = config.load(_write(tmp_path, text))
    assert cfg.metrics.top_k == [5] and cfg.gate["v"]["kl_mean"].max == 0.01 and cfg.gate["v"]["kl_mean"].min == 0
    with pytest.raises(config.ConfigError, match="not valid YAML"):  # an unhashable key: a YAML error, not a crash
        config.load(_write(tmp_path, BASE + "? [1, 2]\n: x\n"))


def test_duplicate_variant_names(tmp_path):
    path = _write(tmp_path, BASE.replace("variants: [{name: v, source: zoo:tiny-qwen1.5-s}]",
                                         "variants: [{name: v, source: a}, {name: v, source: b}]"))
    with pytest.raises(config.ConfigError, match="repeated"):
        config.load(path)


@pytest.mark.parametrize(
    "gate, message",
    [
        ("gate: {v: {kl_mean: {maxx: 0.01}}}", r"unknown key 'gate\.v\.kl_mean\.maxx'"),
        ("gate: {v: {kl_mean: {}}}", r"gate\.v\.kl_mean.*at least one of min, max, max_x_floor"),
        ("gate: {w: {kl_mean: {max: 0.01}}}", r"gate key 'w' is not the name of a variant .*; the variants are: v\b"),
        ("gate: {vv: {kl_mean: {max: 0.01}}}", r"gate key 'vv' is not the name of a variant .*\(did you mean 'v'\?\); the variants are: v"),
        ("noise_floor: vv", r"noise_floor 'vv' is not the name of a variant \(did you mean 'v'\?\); the variants are: v"),
        ("gate: {v: {kl_mean: {max_x_floor: 20}}}", r"gate\.v uses max_x_floor, but no noise_floor is set"),
        ("gate: {v: {kl_mean: {max: lots}}}", r"key 'gate\.v\.kl_mean\.max'.*'lots'"),
        ("gate: {v: {kl_meen: {max: 0.01}}}", r"c\.yaml: gate\.v\.kl_meen: no pair aggregate is called 'kl_meen'; did you mean kl_mean"),
        ("gate: {v: {top20_overlap: {min: 0.9}}}", r"gate\.v\.top20_overlap: no pair aggregate.*did you mean top10_overlap"),
        ("gate: {v: {kl_floor_multiple: {max: 9}}}", r"gate\.v\.kl_floor_multiple is the mean KL over the noise floor's, and no noise_floor is set"),
        # an infinite bound passes everything, and JSON (the run record) would keep it as null: `check --run` then failed
        ("gate: {v: {kl_mean: {max: .inf}}}", r"key 'gate\.v\.kl_mean\.max': Input should be a finite number"),
        ("gate: {v: {kl_mean: {min: -.inf}}}", r"key 'gate\.v\.kl_mean\.min': Input should be a finite number"),
        ("gate: {v: {bpb_diff: {max: 0.1}}}", r"gate\.v\.bpb_diff: only a pair of two vocabularies has bpb_diff .*set cross_vocab: true"),
        ("gate: {v: {kl_mean: {min: 1, max: 0}}}", r"gate\.v\.kl_mean': min \(1\.0\) is above max \(0\.0\): no value could pass"),
    ],
)  # fmt: skip
def test_gate_limits_are_validated(tmp_path, gate, message):
    path = _write(tmp_path, BASE + gate + "\n")
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)


def test_gate_limits_load(tmp_path):
    cfg = config.load(_write(tmp_path, BASE + "noise_floor: v\ngate: {'*': {kl_mean: {max: 0.01, max_x_floor: 20}}}\n"))
    assert cfg.gate["*"]["kl_mean"].max == 0.01 and cfg.gate["*"]["kl_mean"].max_x_floor == 20
    cfg = config.load(_write(tmp_path, BASE + "noise_floor: v\nmetrics: {top_k: [20]}\n"
                             "gate: {v: {top20_overlap: {min: 0.9}, kl_floor_multiple: {max: 9}, delta_p_p0_1: {min: -0.1}}}\n"))
    assert set(cfg.gate["v"]) == {"top20_overlap", "kl_floor_multiple", "delta_p_p0_1"}


def test_gate_metrics_are_what_a_pair_has():
    """The names a gate may take are the scalar aggregates a real pair gets, for the config's top-k sizes."""
    import numpy as np

    from harness import aggregate

    rng = np.random.default_rng(1)
    n = 40
    m = {k: rng.random(n) for k in ("kl", "kl_rev", "js", "tv", "delta_p", "delta_p_top", "nll_ref", "nll_cand",
                                    "entropy_ref", "entropy_cand", "p_top_ref", "margin_ref", "top3_overlap")}  # fmt: skip
    m |= {"top1_agree": rng.random(n) < 0.9, "ref_top_rank": rng.integers(0, 4, n)}
    agg = aggregate.pair_aggregates(m, np.arange(n) % 5, ks=[3], resamples=20, seed=0)
    scalars = {k for k, v in agg.items() if isinstance(v, float | int) and not isinstance(v, bool)}
    known = set(config.gate_metrics([3], floor=False))
    assert scalars <= known and "top3_overlap" in known and "top5_overlap" not in known
    assert known - scalars == {k for k in known if k.startswith(("kl_smoothed_", "kl_rev_smoothed_"))}  # only with metrics.smoothing_eps
    assert "kl_floor_multiple" in config.gate_metrics([3], floor=True)


@pytest.mark.parametrize(
    "variants, message",
    [
        ("[{name: ref, source: zoo:tiny-qwen1.5-s}]", r"c\.yaml: variant name 'ref' is the reference's name"),
        ("[{name: org/model, source: zoo:tiny-qwen1.5-s}]", r"key 'variants\.0\.name': .*report file names.*letters, digits and \. _ \+ - only.*'org/model'"),
        ("[{name: ' v', source: zoo:tiny-qwen1.5-s}]", r"key 'variants\.0\.name'"),
    ],
)  # fmt: skip
def test_variant_names_are_checked(tmp_path, variants, message):
    path = _write(tmp_path, BASE.replace("[{name: v, source: zoo:tiny-qwen1.5-s}]", variants))
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_an_unknown_device_is_an_error(tmp_path, device):
    path = _write(tmp_path, BASE.replace("source: zoo:tiny-qwen1.5-s}]", f"source: zoo:tiny-qwen1.5-s, device: '{device}'}}]"))
    with pytest.raises(config.ConfigError, match=r"c\.yaml.*key 'variants\.0\.device': a device is auto .*cuda:N.*sharded"):
        config.load(path)
    for ok in ("auto", "cpu", "cuda", "cuda:1", "sharded"):
        assert config.load(path, [f"variants.0.device={ok}"]).variants[0].device == ok


def test_a_backend_needs_the_gptqmodel_loader(tmp_path):
    path = _write(tmp_path, BASE.replace("source: zoo:tiny-qwen1.5-s}]", "source: zoo:tiny-qwen1.5-s, backend: gptq_torch}]"))
    with pytest.raises(config.ConfigError, match=r"c\.yaml.*model 'v': backend 'gptq_torch' chooses a kernel of gptqmodel's loader; add loader: gptqmodel"):
        config.load(path)
    assert config.load(path, ["variants.0.loader=gptqmodel"]).variants[0].backend == "gptq_torch"
    with pytest.raises(config.ConfigError, match=r"key 'variants\.0\.loader'"):
        config.load(path, ["variants.0.loader=auto_gptq"])


def test_an_override_that_is_not_yaml(tmp_path):
    path = _write(tmp_path, BASE)
    with pytest.raises(config.ConfigError, match=r"override 'name=\[': its value is not valid YAML"):
        config.load(path, ["name=["])
