"""Step model: FLOP and byte counts against hand-computed values, roofline behaviour, profiles."""

from __future__ import annotations

import dataclasses
import json

import pytest

from joule.model.config import ModelConfig
from joule.perf.hardware import CATALOG, get_hardware, parse_price_overrides
from joule.perf.profile import DeviceProfile, resolve_profile
from joule.perf.step_model import (
    BatchShape,
    DecodeStaging,
    SequenceWork,
    StepModel,
    count_attention,
    count_elementwise,
    count_linear,
    count_sampling,
)


def one_layer_config(**overrides) -> ModelConfig:
    values = {"architecture": "LlamaForCausalLM", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    values.update(overrides)
    return ModelConfig(**values)


def flat_profile(**overrides) -> DeviceProfile:
    """A profile with round numbers: 1 TFLOP/s GEMMs (no small-M penalty), 100 GB/s, no overheads."""
    values = {"hardware": "H100", "dtype": "bfloat16", "gemm_flops": 1e12, "gemm_m_half": 0.0, "attention_flops": 1e12,
                  "memory_bandwidth": 1e11, "decode_attention_padded": False, "kv_passes": 1.0}
    values.update(overrides)
    return DeviceProfile(**values)


def test_linear_counts_for_one_layer_match_hand_computation():
    config = one_layer_config()
    batch = BatchShape([SequenceWork(3, 0, True), SequenceWork(1, 10, True), SequenceWork(4, 2, False)])
    gemms = count_linear(config, batch, element_bytes=2)
    # rows = 3 + 1 + 4 = 8; qkv: 64 -> 4*16 + 2*2*16 = 128; o: 64 -> 64; gate_up: 64 -> 256; down: 128 -> 64.
    # The (only, so last) layer's o, gate_up and down run on the 2 sampled rows alone, as lm_head does.
    expected_flops = [2 * 8 * 64 * 128, 2 * 2 * 64 * 64, 2 * 2 * 64 * 256, 2 * 2 * 128 * 64]
    expected_bytes = [2 * (64 * 128 + 8 * 64 + 8 * 128), 2 * (64 * 64 + 2 * 64 + 2 * 64),
                      2 * (64 * 256 + 2 * 64 + 2 * 256), 2 * (128 * 64 + 2 * 128 + 2 * 64)]
    assert [rows for rows, _ in gemms] == [8, 2, 2, 2, 2]
    assert [count.flops for _, count in gemms[:4]] == expected_flops
    assert [count.bytes for _, count in gemms[:4]] == expected_bytes
    lm_head = gemms[4][1]
    assert lm_head.flops == 2 * 2 * 64 * 1000
    assert lm_head.bytes == 2 * (64 * 1000 + 2 * 64 + 2 * 1000)


def test_the_last_layers_tail_runs_on_sampling_rows_of_eager_steps_only():
    config = one_layer_config(num_hidden_layers=4)
    decode = count_linear(config, BatchShape.decode(6, 30), 2)
    assert [rows for rows, _ in decode] == [6] * 5  # every row samples: all four layers whole
    prompt = count_linear(config, BatchShape.prefill([40, 24]), 2)
    assert [rows for rows, _ in prompt] == [64, 64, 2, 64, 2, 64, 2, 2]
    assert prompt[1][1].flops == 3 * 2 * 64 * 64 * 64  # o over every row in three layers
    chunk_only = count_linear(config, BatchShape([SequenceWork(16, 0, False)]), 2)
    assert [rows for rows, _ in chunk_only] == [16, 16, 1, 16, 1, 16, 1]  # no sampled row: one kept, no lm_head


def test_layer_counts_scale_with_layers_but_lm_head_does_not():
    batch = BatchShape.decode(2, 5)
    one = count_linear(one_layer_config(), batch, 2)
    three = count_linear(one_layer_config(num_hidden_layers=3), batch, 2)
    assert [c.flops for _, c in three[:4]] == [3 * c.flops for _, c in one[:4]]
    assert three[4][1].flops == one[4][1].flops


def test_attention_counts_for_one_layer_match_hand_computation():
    config = one_layer_config()
    # A chunk of 3 new rows after 2 cached ones sees 2*3 cached pairs + 3*4/2 causal pairs = 12 pairs.
    # A decode at context 10 sees 11 keys. 4 heads x 16 dims x 4 FLOPs (QK^T and PV) per pair.
    batch = BatchShape([SequenceWork(3, 2, True), SequenceWork(1, 10, True)])
    prefill, decode = count_attention(config, batch, element_bytes=2)
    assert prefill.flops == 4 * 4 * 16 * 12
    assert decode.flops == 4 * 4 * 16 * 11
    kv_token = 2 * 2 * 16 * 2  # K and V, 2 KV heads x 16 dims, bf16
    q_token = 2 * 4 * 16 * 2  # read q, write output
    assert prefill.bytes == 3 * q_token + 5 * kv_token
    assert decode.bytes == q_token + 11 * kv_token


def test_padded_decode_reads_every_sequence_at_the_longest_context():
    config = one_layer_config()
    profile = flat_profile(decode_attention_padded=True, kv_passes=3.0)
    batch = BatchShape([SequenceWork(1, 9, True), SequenceWork(1, 99, True)])
    _, decode = count_attention(config, batch, 2, profile)
    kv_token, q_token = 2 * 2 * 16 * 2, 2 * 4 * 16 * 2
    assert decode.bytes == 2 * (q_token + 100 * kv_token * 3)
    assert decode.flops == 2 * 4 * 4 * 16 * 100


def test_padded_decodes_in_a_mixed_step_pad_to_the_longest_decode_only():
    config = one_layer_config()
    profile = flat_profile(decode_attention_padded=True, kv_passes=3.0)
    batch = BatchShape([SequenceWork(1, 9, True), SequenceWork(1, 49, True), SequenceWork(200, 0, True)])
    _, decode = count_attention(config, batch, 2, profile)
    kv_token, q_token = 2 * 2 * 16 * 2, 2 * 4 * 16 * 2
    assert decode.bytes == 2 * (q_token + 50 * kv_token * 3)  # the 200-row prompt does not widen the padding


def test_chunk_layer_overhead_only_in_steps_with_a_prompt_chunk():
    config = one_layer_config(num_hidden_layers=4)
    model = StepModel(config, flat_profile(chunk_layer_overhead_s=1e-4, layer_overhead_s=1e-5))
    assert model.overhead_seconds(BatchShape.decode(3, 20)) == pytest.approx(4 * 1e-5)
    mixed = BatchShape([SequenceWork(1, 20, True), SequenceWork(30, 0, True)])
    assert model.overhead_seconds(mixed) == pytest.approx(4 * 1e-5 + 4 * 1e-4)


def test_decode_staging_follows_the_backends_rebuild_rule():
    staging = DecodeStaging(kv_bytes_per_token=100.0)
    # First decode step: copies built with 64 spare tokens, rounded up to 16-token blocks.
    assert staging.observe(["a", "b"], [10, 20], decode_only=True) == ("rebuild", 96)
    assert staging.observe(["a", "b"], [11, 21], decode_only=True) == ("append", 96)
    assert staging.observe(["a"], [12], decode_only=True) == ("rebuild", 80)  # b finished
    assert staging.observe(["a", "c"], [13, 40], decode_only=False) == ("gather", 0)  # c's prompt chunk
    assert staging.observe(["a", "c"], [14, 41], decode_only=True) == ("rebuild", 112)
    for length in range(42, 113):
        assert staging.observe(["a", "c"], [length - 27, length], decode_only=True) == ("append", 112)
    assert staging.observe(["a", "c"], [86, 113], decode_only=True) == ("rebuild", 192)  # outgrew its copies
    bounded = DecodeStaging(kv_bytes_per_token=100.0, max_copy_bytes=2 * 96 * 100.0)
    assert bounded.observe(["a", "b"], [10, 20], decode_only=True) == ("rebuild", 96)
    assert bounded.observe(["a", "b", "c"], [11, 21, 5], decode_only=True) == ("gather", 0)


def test_staged_decodes_read_kv_once_and_rebuilds_pay_per_row_token():
    config = one_layer_config(num_hidden_layers=2)
    profile = flat_profile(decode_attention_padded=True, kv_passes=3.0, decode_staging=True,
                           staging_rebuild_s_per_token_layer=1e-6)
    model = StepModel(config, profile)
    sequences = [SequenceWork(1, 9, True), SequenceWork(1, 29, True)]
    kv_token, q_token = 2 * 2 * 16 * 2, 2 * 4 * 16 * 2
    for mode, passes in (("append", 1), ("rebuild", 1), ("gather", 3)):
        _, decode = count_attention(config, BatchShape(sequences, mode, 96), 2, profile)
        assert decode.bytes == 2 * 2 * (q_token + 30 * kv_token * passes)
    append = model.predict(BatchShape(sequences, "append", 96))
    rebuild = model.predict(BatchShape(sequences, "rebuild", 96))
    assert rebuild.elapsed_seconds - append.elapsed_seconds == pytest.approx(1e-6 * 2 * 96 * 2)
    # Unknown history: the steady state (appending), as far as the copies fit.
    assert model.predict(BatchShape(sequences)).elapsed_seconds == pytest.approx(append.elapsed_seconds)


def test_eager_gpu_steps_take_the_larger_of_host_launches_and_device_time():
    config = one_layer_config(num_hidden_layers=10)
    profile = flat_profile(host_overlaps_device=True, chunk_layer_overhead_s=1e-3, step_overhead_s=1e-4)
    model = StepModel(config, profile)
    small = BatchShape.prefill([8])  # host-bound: 10 ms of launches, microseconds of kernels
    assert model.predict(small).elapsed_seconds == pytest.approx(1e-4 + 10e-3)
    additive = StepModel(config, flat_profile(chunk_layer_overhead_s=1e-3, step_overhead_s=1e-4))
    device = sum(additive.predict(small).seconds.values())
    assert additive.predict(small).elapsed_seconds == pytest.approx(1e-4 + 10e-3 + device)
    # Decode-only steps replay a graph after the host prepared it: still additive.
    decode = BatchShape.decode(2, 10)
    assert model.predict(decode).elapsed_seconds == pytest.approx(additive.predict(decode).elapsed_seconds)


def test_summed_linear_roofline_adds_weight_streaming_to_compute():
    config = one_layer_config(hidden_size=512, intermediate_size=1024, vocab_size=4000)
    batch = BatchShape.decode(4, 10)
    roofline = StepModel(config, flat_profile())
    summed = StepModel(config, flat_profile(linear_roofline="sum", scales={"linear_decode": 2.0, "linear_memory": 0.5}))
    _, max_seconds, compute, memory = roofline.linear_parts(batch)
    assert max_seconds < compute + memory
    assert summed.predict(batch).seconds["linear"] == pytest.approx(2.0 * compute + 0.5 * memory)
    assert roofline.predict(batch).seconds["linear"] == pytest.approx(max_seconds)
    with pytest.raises(ValueError, match="linear_roofline"):
        flat_profile(linear_roofline="min")


def test_graphed_chunk_steps_replay_one_padded_pass_per_chunk():
    config = one_layer_config(num_hidden_layers=2)
    profile = flat_profile(host_overlaps_device=True, chunk_graph_max_tokens=512, max_graphed_chunks=2,
                           layer_overhead_s=1e-5, chunk_layer_overhead_s=1e-3)
    model = StepModel(config, profile)
    mixed = BatchShape([SequenceWork(1, 40, True)] * 3 + [SequenceWork(100, 0, True), SequenceWork(17, 5, False)])
    assert model.graph_passes(mixed) == [3, 128, 32]  # the decodes, then each chunk padded to 16 * 2^k
    gemms = count_linear(config, mixed, 2, model.graph_passes(mixed))
    # Weights read per pass; a chunk pass's last layer runs o, gate_up and down on its one last row.
    chunk_pass = [128, 128, 1, 128, 1, 128, 1]
    assert [rows for rows, _ in gemms] == [3] * 4 + chunk_pass + [32 if rows == 128 else 1 for rows in chunk_pass] + [4]
    assert gemms[4][1].flops == 2 * 2 * 128 * 64 * 128  # q/k/v in both layers
    assert gemms[5][1].flops == 2 * 128 * 64 * 64 and gemms[6][1].flops == 2 * 1 * 64 * 64  # o: first layer, tail
    assert model.host_layer_seconds(mixed) == pytest.approx(3 * 2 * 1e-5)  # replays: no eager launches
    device = sum(model.predict(mixed).seconds.values())
    assert model.predict(mixed).elapsed_seconds == pytest.approx(device + 3 * 2 * 1e-5)
    # A graphed step with prompt chunks may cost more per layer and pass than a decode replay; decodes do not pay it.
    extra = StepModel(config, dataclasses.replace(profile, chunk_pass_layer_overhead_s=4e-6))
    assert extra.host_layer_seconds(mixed) == pytest.approx(3 * 2 * (1e-5 + 4e-6))
    assert extra.host_layer_seconds(BatchShape.decode(4, 10)) == pytest.approx(2 * 1e-5)
    # Beyond the captured sizes or the chunk count, the step runs eagerly.
    assert model.graph_passes(BatchShape.prefill([600])) is None
    assert model.graph_passes(BatchShape.prefill([20, 20, 20])) is None
    assert model.is_eager_chunk_step(BatchShape.prefill([20, 20, 20]))
    assert not model.is_eager_chunk_step(BatchShape.decode(4, 10))


def test_a_chunk_that_would_pad_by_many_rows_replays_as_the_engine_cuts_it():
    """The model predicts the passes joule.runtime.prefill_graphs runs (chunk_pieces): 4608 tokens as
    4096 + 512, not one 8192-row pass; 300 tokens pad to 512 (212 rows: not worth another pass)."""
    profile = flat_profile(host_overlaps_device=True, chunk_graph_max_tokens=8192, max_graphed_chunks=4)
    model = StepModel(one_layer_config(num_hidden_layers=2), profile)
    assert model.graph_passes(BatchShape.prefill([4608])) == [4096, 512]
    assert model.graph_passes(BatchShape([SequenceWork(1, 40, True), SequenceWork(1100, 0, True)])) == [1, 1024, 128]
    assert model.graph_passes(BatchShape.prefill([300])) == [512]


def test_linear_decode_scale_applies_to_decode_only_steps_and_defaults_to_linear(tmp_path):
    config = one_layer_config()
    profile = flat_profile(scales={"linear": 2.0, "linear_decode": 0.5})
    base = StepModel(config, flat_profile())
    model = StepModel(config, profile)
    decode, prefill = BatchShape.decode(2, 10), BatchShape.prefill([30])
    assert model.predict(decode).seconds["linear"] == pytest.approx(0.5 * base.predict(decode).seconds["linear"])
    assert model.predict(prefill).seconds["linear"] == pytest.approx(2.0 * base.predict(prefill).seconds["linear"])
    older = flat_profile().to_dict()
    older["scales"] = {"linear": 1.7}  # saved before linear_decode existed
    assert DeviceProfile.from_dict(older).scales["linear_decode"] == 1.7


def test_elementwise_and_sampling_counts():
    config = one_layer_config()
    batch = BatchShape([SequenceWork(2, 0, True)])
    per_row = 2 * 2 * 64 + 2 * (64 + 32) + 3 * 128 + 2 * 3 * 64 + 2 * 32
    assert count_elementwise(config, batch, 2).bytes == 2 * (2 * per_row + 2 * 3 * 64)
    assert count_sampling(config, batch).bytes == 4 * 4 * 1000


def test_roofline_picks_memory_for_decode_and_compute_for_prefill():
    config = one_layer_config(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                              num_key_value_heads=16, head_dim=64, vocab_size=32000)
    model = StepModel(config, flat_profile())
    decode = model.predict(BatchShape.decode(1, 10))
    weight_bytes = 2 * (1024 * 3072 + 1024 * 1024 + 1024 * 8192 + 4096 * 1024 + 1024 * 32000)
    assert decode.seconds["linear"] == pytest.approx(weight_bytes / 1e11, rel=0.01)
    prefill = model.predict(BatchShape.prefill([4096]))
    assert prefill.seconds["linear"] == pytest.approx(prefill.counts["linear"].flops / 1e12, rel=0.05)


def test_small_m_gemm_curve_and_scales_and_overheads():
    profile = flat_profile(gemm_flops=250e9, gemm_m_half=32.0)
    assert profile.gemm_rate(32) == pytest.approx(125e9)
    assert profile.gemm_rate(2048) == pytest.approx(250e9 * 2048 / 2080)
    config = one_layer_config(num_hidden_layers=2)
    batch = BatchShape([SequenceWork(5, 0, True), SequenceWork(1, 3, True)])
    base = StepModel(config, flat_profile()).predict(batch)
    scaled = StepModel(config, flat_profile(
        scales={"linear": 2.0}, step_overhead_s=1e-3, sequence_overhead_s=1e-4, layer_overhead_s=1e-5,
        prefill_sequence_layer_overhead_s=1e-6)).predict(batch)
    # The per-prompt-sequence layer term counts the prompt chunk only (1 of the 2 sequences), in each of 2 layers.
    overhead = 1e-3 + 2 * 1e-4 + 2 * 1e-5 + 1 * 2 * 1e-6
    assert scaled.overhead_seconds == pytest.approx(overhead)
    assert scaled.elapsed_seconds == pytest.approx(base.elapsed_seconds + base.seconds["linear"] + overhead)
    # Decodes beside a prompt chunk add their per-sequence term, not a per-layer one (they are batched): the
    # H200 ran 16 prompts of 512 with 0 or 240 decodes in 29.9 and 30.3 ms (docs/perf-model.md (g)).
    model = StepModel(config, flat_profile(prefill_sequence_layer_overhead_s=1e-6))
    with_decodes = BatchShape([SequenceWork(5, 0, True)] + [SequenceWork(1, 3, True)] * 50)
    assert model.host_layer_seconds(with_decodes) == pytest.approx(model.host_layer_seconds(
        BatchShape([SequenceWork(5, 0, True)])))


def test_energy_is_idle_plus_dynamic_and_capped_at_max_power():
    config = one_layer_config()
    profile = flat_profile(idle_watts=50.0, max_watts=1000.0, energy_per_flop=1e-12, energy_per_byte=1e-11)
    cost = StepModel(config, profile).predict(BatchShape.decode(4, 20))
    expected = 50.0 * cost.elapsed_seconds + 1e-12 * cost.flops + 1e-11 * cost.bytes
    assert cost.energy_joules == pytest.approx(expected)
    capped = StepModel(config, flat_profile(idle_watts=50.0, max_watts=60.0, energy_per_flop=1e-9)).predict(
        BatchShape.decode(4, 20))
    assert capped.energy_joules == pytest.approx(60.0 * capped.elapsed_seconds)


def test_catalog_and_profiles(tmp_path):
    assert {"H100", "H200", "A100-80GB", "L40S", "L4", "A10G", "CPU", "CPU-2core"} <= set(CATALOG)
    for spec in CATALOG.values():
        assert spec.source and spec.idle_watts < spec.max_watts
    assert get_hardware("h100").peak_flops("bfloat16") == 989e12
    assert get_hardware("cpu-dev").default_dtype() == "float32"
    with pytest.raises(ValueError, match="known: H100"):
        get_hardware("TPU")
    assert parse_price_overrides("h100=2.5,L4=0.5") == {"H100": 2.5, "L4": 0.5}
    profile = DeviceProfile.from_hardware(get_hardware("H100"))
    assert profile.gemm_flops == pytest.approx(0.79 * 989e12)
    path = tmp_path / "p.json"
    profile.save(path)
    assert DeviceProfile.load(path) == profile
    assert resolve_profile("H100", profile_path=path) == profile
    path.write_text(json.dumps({**profile.to_dict(), "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        DeviceProfile.load(path)


def test_request_events_cost_per_finished_request_and_token_and_after_idle():
    """Finishing requests pay per request and per KV token they held; a step after idle time pays once."""
    config = one_layer_config()
    profile = flat_profile(finish_overhead_s=1e-4, finish_token_overhead_s=1e-6, wake_overhead_s=2e-3)
    model = StepModel(config, profile)
    steady = BatchShape([SequenceWork(1, 10, True), SequenceWork(1, 20, True), SequenceWork(1, 30, True)])
    events = BatchShape([SequenceWork(1, 10, True, True), SequenceWork(1, 20, True, True), SequenceWork(1, 30, True)],
                        after_idle=True)
    assert events.num_finished == 2 and events.finished_tokens == 11 + 21
    # 2 x 100 us + 32 tokens x 1 us + 2 ms = 2.232 ms more than the same step without events.
    assert model.event_seconds(events) == pytest.approx(2 * 1e-4 + 32 * 1e-6 + 2e-3)
    assert model.predict(events).elapsed_seconds - model.predict(steady).elapsed_seconds == pytest.approx(2.232e-3)
    assert model.event_seconds(steady) == 0.0
    # Profiles saved before the terms existed predict as before (the fields default to 0).
    assert StepModel(config, flat_profile()).predict(events).elapsed_seconds == pytest.approx(
        StepModel(config, flat_profile()).predict(steady).elapsed_seconds)


def test_eager_gpu_steps_add_host_and_device_time_when_fitted_so():
    """host_overlaps_device=False: an eager chunk step pays its per-layer host work on top of the kernels."""
    config = one_layer_config()
    shape = BatchShape.prefill([64] * 6)  # 6 chunks: eager (at most 4 are graphed)
    overlapped = StepModel(config, flat_profile(chunk_layer_overhead_s=1e-3, host_overlaps_device=True,
                                                chunk_graph_max_tokens=8192))
    summed = StepModel(config, flat_profile(chunk_layer_overhead_s=1e-3, host_overlaps_device=False,
                                            chunk_graph_max_tokens=8192))
    assert summed.is_eager_chunk_step(shape)
    device = sum(summed.predict(shape).seconds.values())
    host = summed.host_layer_seconds(shape)
    assert host == pytest.approx(1e-3)  # one layer
    assert summed.predict(shape).elapsed_seconds == pytest.approx(device + host)
    assert overlapped.predict(shape).elapsed_seconds == pytest.approx(max(device, host))


def test_graph_steps_per_layer_overhead_can_be_device_time_that_a_queued_step_cannot_hide():
    """Replayed graphs launch no kernels from the host: their per-layer term is the gaps between dependent kernels
    on the device. Without lookahead nothing changes (host + device); queued behind another step, a graphed step
    costs max(host, device + gaps), an eager one still max(host + launches, device)."""
    config = one_layer_config(num_hidden_layers=10)
    values = {"host_overlaps_device": True, "chunk_graph_max_tokens": 512, "max_graphed_chunks": 2,
              "layer_overhead_s": 2e-5, "step_overhead_s": 1e-4, "chunk_layer_overhead_s": 1e-3}
    host_side = StepModel(config, flat_profile(**values))
    device_side = StepModel(config, flat_profile(graph_layer_overhead_on_device=True, **values))
    for batch in (BatchShape.decode(2, 10), BatchShape([SequenceWork(1, 40, True), SequenceWork(100, 0, True)])):
        before, after = host_side.predict(batch), device_side.predict(batch)
        assert after.elapsed_seconds == pytest.approx(before.elapsed_seconds)
        assert before.device_overhead_seconds == 0.0
        layers = device_side.host_layer_seconds(batch)
        assert after.device_overhead_seconds == pytest.approx(layers) and layers > 0
        assert after.device_seconds == pytest.approx(sum(after.seconds.values()) + layers)
        assert after.host_seconds == pytest.approx(after.overhead_seconds - layers)
        queued = dataclasses.replace(batch, queued=True)
        assert host_side.predict(queued).elapsed_seconds == pytest.approx(
            max(before.overhead_seconds, sum(before.seconds.values())))
        assert device_side.predict(queued).elapsed_seconds == pytest.approx(max(after.host_seconds, after.device_seconds))
    eager = BatchShape.prefill([20, 20, 20])  # three chunks: beyond max_graphed_chunks, launched eagerly
    assert device_side.predict(eager).device_overhead_seconds == 0.0


def test_streamed_outputs_and_metering_cost_host_time_only_where_a_step_has_them():
    """A sampled sequence of a streaming request pays for its output every step; a metered step pays the meter's
    reads and a share per sequence. Prompt chunks that sample nothing make no output."""
    config = one_layer_config()
    profile = flat_profile(streamed_sequence_overhead_s=2e-6, metered_sequence_overhead_s=1e-6,
                           metered_step_overhead_s=5e-5)
    model = StepModel(config, profile)
    streamed = BatchShape([SequenceWork(1, 10, True), SequenceWork(1, 20, True), SequenceWork(50, 0, False)])
    final_only = BatchShape([dataclasses.replace(s, streams=False) for s in streamed.sequences])
    unmetered = dataclasses.replace(final_only, metered=False)
    assert streamed.num_streamed == 2 and final_only.num_streamed == 0
    assert model.overhead_seconds(streamed) - model.overhead_seconds(final_only) == pytest.approx(2 * 2e-6)
    assert model.overhead_seconds(final_only) - model.overhead_seconds(unmetered) == pytest.approx(5e-5 + 3 * 1e-6)
    # Profiles calibrated before the terms existed: every kind alike.
    older = StepModel(config, flat_profile())
    assert older.predict(streamed).elapsed_seconds == older.predict(unmetered).elapsed_seconds


def test_a_plans_shape_streams_unless_its_request_asks_for_final_only_outputs():
    from joule.engine.plan import ScheduledSequence, StepPlan
    from joule.engine.request import Request
    from joule.sampling_params import RequestOutputKind, SamplingParams

    def sequence(name, kind):
        request = Request(name, [1, 2, 3], SamplingParams(max_tokens=4, output_kind=kind), max_tokens=4)
        return ScheduledSequence(request, [3], 2, [0], samples=True)

    plan = StepPlan([sequence("a", RequestOutputKind.DELTA), sequence("b", RequestOutputKind.FINAL_ONLY),
                     sequence("c", RequestOutputKind.CUMULATIVE)])
    shape = BatchShape.from_plan(plan, metered=False)
    assert [s.streams for s in shape.sequences] == [True, False, True] and not shape.metered
    assert BatchShape.from_plan(plan).metered


def test_a_staged_decode_step_keeps_what_else_its_shape_says():
    """Resolving the staging mode of a decode-only step of unknown history keeps whether it was queued behind
    another and metered: a queued step costs max(host, device) with staging as without."""
    config = one_layer_config()
    profile = flat_profile(decode_staging=True, step_overhead_s=1e-3)
    model = StepModel(config, profile)
    queued = dataclasses.replace(BatchShape.decode(4, 100), queued=True, metered=False)
    resolved = model.resolve_staging(queued)
    assert resolved.staging == "append" and resolved.queued and not resolved.metered
    cost = model.predict(queued)
    assert cost.elapsed_seconds == pytest.approx(max(cost.host_seconds, cost.device_seconds))
