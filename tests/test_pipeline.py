"""The run's stages around extraction: warnings a user needs before a long run starts."""

from __future__ import annotations

from pathlib import Path

from harness import config, loaders, pipeline

ROOT = Path(__file__).parents[1]


def _cfg():
    return config.load(ROOT / "configs" / "qwen1.5-0.5b.yaml", [])  # bfloat16 reference, float16 variants, hub ids


def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {flags}\nbogomips\t: 1\n")
    return str(path)


def test_half_precision_on_a_cpu_without_its_instructions_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub ids' sizes are not in this machine's cache: unknown
    cfg = _cfg()
    where = {s.name: loaders.Loaded(s, s.source, f"hub:{s.source}@main", "cpu") for s in cfg.models}
    warned = pipeline.slow_half_precision(cfg, where, _cpuinfo(tmp_path, ""), size_of=lambda _: None)  # size unknown
    assert pipeline.slow_half_precision(cfg, where, _cpuinfo(tmp_path, ""), size_of=lambda _: 464_000_000) == warned
    assert len(warned) == 2
    assert warned[0].startswith("chat-bf16, base run in bfloat16 on a CPU without avx512_bf16 or amx_bf16")
    assert warned[1].startswith("chat-fp16, chat-gptq-int8, chat-gptq-int4 run in float16 on a CPU without avx512_fp16")
    # the instructions there, a GPU, a zoo build (tiny), or no /proc/cpuinfo: nothing to say
    assert pipeline.slow_half_precision(cfg, where, _cpuinfo(tmp_path, "avx512_bf16 amx_fp16")) == []
    on_gpu = {n: loaders.Loaded(x.spec, x.path, x.fingerprint, "cuda:0") for n, x in where.items()}
    assert pipeline.slow_half_precision(cfg, on_gpu, _cpuinfo(tmp_path, "")) == []
    zoo = config.load(ROOT / "configs" / "default.yaml", [])
    at_zoo = {s.name: loaders.Loaded(s, s.source, "x", "cpu") for s in zoo.models}
    assert pipeline.slow_half_precision(zoo, at_zoo, _cpuinfo(tmp_path, "")) == []
    assert pipeline.slow_half_precision(cfg, where, str(tmp_path / "absent")) == []
    assert pipeline.slow_half_precision(cfg, where, _cpuinfo(tmp_path, ""), size_of=lambda _: 20_000_000) == []  # tiny
