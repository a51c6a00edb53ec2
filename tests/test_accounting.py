"""Parameter and FLOP accounting, Step Law and the Chinchilla prior against published numbers."""

import math

import pytest

from scaleforge.arch.common import shapes
from scaleforge.arch.common.decoder import megatron_flops_per_token
from scaleforge.arch.dense.config import DenseConfig
from scaleforge.orchestrator.plan import hparams, prior

GPT3 = DenseConfig(layers=96, hidden=12288, heads=96, kv_heads=96, ffn_hidden=32768, vocab_size=51200)


def test_llama2_7b_parameter_count():
    cfg = DenseConfig(layers=32, hidden=4096, heads=32, kv_heads=32, ffn_hidden=11008, vocab_size=32000)
    assert cfg.num_params() == 6_738_415_616  # the published LLaMA-2 7B count
    assert cfg.non_embedding_params() == 6_738_415_616 - 2 * 32000 * 4096


def test_gqa_tied_parameter_count_by_hand():
    cfg = DenseConfig(layers=2, hidden=256, heads=8, kv_heads=2, ffn_hidden=704, vocab_size=1000,
                      tied_embeddings=True)
    # per layer: qkv 256*(8*32 + 2*2*32) = 98,304; out 256*256 = 65,536; fc1 256*2*704 = 360,448;
    # fc2 704*256 = 180,224; two norms 512  -> 705,024
    # total: embedding 256,000 (tied: once) + 2 * 705,024 + final norm 256 = 1,666,304
    assert cfg.num_params() == 1_666_304
    assert cfg.non_embedding_params() == 1_410_304
    # matmul params 2 * 704,512 + output 256,000 = 1,665,024; 6x = 9,990,144;
    # attention 12 * 2 layers * 8 heads * 32 * 128 = 786,432
    assert cfg.flops_per_token(128) == 10_776_576


def test_gpt3_flops_per_token_matches_megatron_and_palm():
    fpt = GPT3.flops_per_token(2048)
    assert fpt == pytest.approx(1.0764e12, rel=1e-4)  # methods 8.9, Megatron's formula per token
    assert fpt == pytest.approx(
        megatron_flops_per_token(layers=96, hidden=12288, seq_len=2048, vocab_size=51200), rel=1e-12
    )
    # without the output layer this is the PaLM 6N + 12 L s h with N = 12 L h^2: 1.0727e12
    assert fpt - 6 * 12288 * 51200 == pytest.approx(1.0727e12, rel=1e-4)


def test_step_law_numbers():
    assert hparams.step_law_lr(1e9, 1e11) == pytest.approx(1.632e-3, rel=1e-3)
    assert hparams.step_law_batch_tokens(1e11) == pytest.approx(1.108e6, rel=1e-3)
    assert hparams.batch_sequences(1e11, 2048, 1) == 541
    assert hparams.batch_sequences(1e11, 2048, 64) == 512  # nearest multiple of micro_batch x dp


def test_plan_hparams_wsd_and_batch_multiple():
    hp = hparams.plan_hparams(n_non_embedding=10**9, tokens=1e11, seq_len=2048, batch_multiple=24)
    assert hp.global_batch % 24 == 0 and hp.schedule == "wsd"
    assert hp.steps * hp.global_batch * 2048 == pytest.approx(1e11, rel=0.01)
    assert hp.lr == pytest.approx(1.632e-3, rel=2e-3)
    assert hp.lr * hp.min_lr_ratio == pytest.approx(1e-5, rel=1e-3)  # Step Law's final lr
    tiny = hparams.plan_hparams(n_non_embedding=10**5, tokens=1e6, seq_len=128, batch_multiple=1)
    assert tiny.lr == hparams.MAX_LR  # the extrapolated Step Law value (> 0.04) is capped


def test_epoch_allocation_and_loss():
    # methods 8.1: C = 6 * 70e9 * 1.4e12; Epoch's parameters give N 7.30e10, D 1.34e12, L 1.9736
    n, d = prior.compute_optimal(prior.EPOCH_PARAMS, 6 * 70e9 * 1.4e12)
    assert n == pytest.approx(7.30e10, rel=5e-3)
    assert d == pytest.approx(1.34e12, rel=5e-3)
    assert 6 * n * d == pytest.approx(6 * 70e9 * 1.4e12, rel=1e-9)
    assert prior.chinchilla_loss(prior.EPOCH_PARAMS, 70e9, 1.4e12) == pytest.approx(1.9736, abs=1e-4)


def test_prior_interval_contains_point_and_uses_samples():
    f = lambda p: prior.chinchilla_loss(p, 1e9, 2e10)  # noqa: E731
    lo, hi = prior.interval(f, prior.EPOCH_PARAMS, prior.EPOCH_CI)
    assert lo < f(prior.EPOCH_PARAMS) < hi
    samples = [{"E": 1.8 + 0.001 * i} for i in range(101)]
    lo2, hi2 = prior.interval(lambda p: p["E"], prior.EPOCH_PARAMS, {}, samples)
    assert (lo2, hi2) == (pytest.approx(1.802), pytest.approx(1.898))  # 2.5% / 97.5% ranks


def test_prior_samples_match_epochs_intervals():
    samples = prior.prior_samples()
    assert len(samples) == 400
    for name, (lo, hi) in prior.EPOCH_CI.items():
        got_lo, got_hi = prior.interval(lambda p: p[name], prior.EPOCH_PARAMS, {}, samples)
        # the bootstrap of the Huber refit reproduces Epoch's published 95% intervals roughly
        assert got_lo == pytest.approx(lo, rel=0.15) and got_hi == pytest.approx(hi, rel=0.15), name
    n_opt, _ = prior.compute_optimal(prior.EPOCH_PARAMS, 1e21)
    lo, hi = prior.interval(lambda p: prior.compute_optimal(p, 1e21)[0], prior.EPOCH_PARAMS, {}, samples)
    assert lo < n_opt < hi and hi / lo < 1.5  # correlations kept: far narrower than the box


@pytest.mark.parametrize("vocab", [8192, 32000])
def test_shapes_round_trip(vocab):
    base = DenseConfig(vocab_size=vocab)
    for exponent in range(14, 23):  # 10^7 .. 10^11 in half decades
        target = 10 ** (exponent / 2)
        cfg = shapes.dense_shape(target, base)
        assert abs(cfg.num_params() / target - 1) < 0.1, (target, cfg)
        step = 64 if cfg.hidden >= 256 else 32  # tiny widths step by 32 with 32-wide heads
        assert cfg.hidden % step == 0 and cfg.ffn_hidden % step == 0
        assert cfg.heads * cfg.head_dim == cfg.hidden and cfg.head_dim in (32, 64, 128)
        assert cfg.ffn_hidden >= 8 * cfg.hidden / 3
        assert cfg.layers % shapes.depth_step(cfg.hidden) == 0  # pipeline stages split it
        if cfg.hidden >= 2048:
            assert cfg.heads % 4 == 0 and cfg.layers % 4 == 0  # TP and PP of 4 divide them
        assert 32 / 1.5 <= cfg.hidden / cfg.layers <= 128 * 1.5  # the aspect rule, +- depth slack
        assert shapes.dense_shape(target, base) == cfg  # deterministic


def test_shapes_tiny_cpu_models():
    base = DenseConfig(vocab_size=512)
    for target in (1e5, 3e5, 1e6, 3e6, 1e7):
        cfg = shapes.dense_shape(target, base)
        assert abs(math.log(cfg.num_params() / target)) < math.log(1.25), (target, cfg)
        assert cfg.hidden % 16 == 0 and cfg.hidden % cfg.head_dim == 0
        if cfg.hidden < 256:
            assert cfg.head_dim == (16 if cfg.hidden < 128 else 32)


def test_shapes_known_widths():
    llama = shapes.dense_shape(6.7e9, DenseConfig(vocab_size=32000))
    assert (llama.hidden, llama.head_dim) == (4096, 128) and llama.heads % 8 == 0
    gpt3 = shapes.dense_shape(1.75e11, DenseConfig(vocab_size=51200))
    assert (gpt3.layers, gpt3.hidden, gpt3.heads, gpt3.ffn_hidden) == (96, 12288, 96, 32768)


def test_shapes_reject_impossible_targets():
    from scaleforge.errors import ConfigError

    with pytest.raises(ConfigError, match="below the smallest dense model"):
        shapes.dense_shape(1e4, DenseConfig(vocab_size=32000))
    with pytest.raises(ConfigError):
        shapes.dense_shape(float("nan"), DenseConfig())
