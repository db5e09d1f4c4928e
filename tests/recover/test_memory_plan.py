"""The recovery memory the plan computes, on the public shapes of real MoE models (meta device: no memory, no
weights), against hand computations from their config numbers; and the plan's refusals."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeprune.models import MoEAdapter
from moeprune.recover.memory import ADAM_STATE_BYTES, SAVED_PER_LAYER, memory_table, recovery_memory

# public config numbers (the models' config.json on the hub)
REAL = {
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, vocab_size=32000)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                                        norm_topk_prob=True)),
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                  num_experts_per_tok=8, vocab_size=50304)),
    "deepseek-v2-lite": ("deepseek_v2", dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                                             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                                             first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
                                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                             vocab_size=102400, n_group=1, topk_group=1)),
}
# routed experts' (gate, up, down) widths and MoE layer counts, from the numbers above
EXPERTS = {"mixtral-8x7b": (4096, 14336, 8, 32), "qwen3-30b-a3b": (2048, 768, 128, 48),
           "olmoe-1b-7b": (2048, 1024, 64, 16), "deepseek-v2-lite": (2048, 1408, 64, 26)}


def _meta(name: str) -> MoEAdapter:
    model_type, numbers = REAL[name]
    config = CONFIG_MAPPING[model_type](**numbers)
    with torch.device("meta"):
        return MoEAdapter(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("name", sorted(REAL))
def test_router_kd_trains_the_kept_router_rows(name):
    hidden, _, e, layers = EXPERTS[name]
    adapter = _meta(name)
    mem = recovery_memory(adapter, method="router_kd", dtype="bfloat16", n_keep=e // 2, execution="memory",
                          batch_tokens=512, step_tokens=4096, top_k=64, target_tokens=100_000)
    assert mem.trained_params == layers * (e // 2) * hidden  # one (E, hidden) router per MoE layer, kept rows
    assert mem.state == mem.trained_params * (ADAM_STATE_BYTES + 2)
    assert mem.targets == 100_000 * 64 * 12
    params = sum(p.numel() for p in adapter.model.parameters())
    assert mem.weights == params * 2  # the whole (unpruned) model in bf16: the teacher runs before surgery


@pytest.mark.parametrize("name", sorted(REAL))
def test_moe_kd_trains_kept_experts_shared_experts_and_routers(name):
    hidden, inter, e, layers = EXPERTS[name]
    adapter = _meta(name)
    keep = e // 2
    mem = recovery_memory(adapter, method="moe_kd", dtype="bfloat16", n_keep=keep, execution="memory",
                          batch_tokens=512, step_tokens=4096, top_k=64, target_tokens=0)
    kept_experts = layers * keep * 3 * hidden * inter
    routers = layers * keep * hidden
    shared = mem.trained_params - kept_experts - routers
    assert shared >= 0  # shared experts (and shared-expert gates) are trained too; Mixtral/Qwen3/OLMoE have none
    if name != "deepseek-v2-lite":
        assert shared == 0
    else:  # 2 shared experts of width 1408 each, fused into one MLP of 2816 per MoE layer
        assert shared == layers * 3 * hidden * 2 * 1408
    cfg = adapter.config
    assert mem.activations == 4096 * (cfg.num_hidden_layers * SAVED_PER_LAYER * hidden * 2 + 12 * cfg.vocab_size)


def test_the_qwen3_30b_table_says_what_fits_one_80_gb_gpu():
    adapter = _meta("qwen3-30b-a3b")
    rows = [recovery_memory(adapter, method=m, dtype="bfloat16", n_keep=64, execution="memory", batch_tokens=512,
                            step_tokens=512, top_k=64, target_tokens=262_144)
            for m in ("router_kd", "moe_kd", "router_kd_block", "moe_kd_block")]
    by = {r.method: r for r in rows}
    assert by["moe_kd"].total > 240e9  # ~16 B per trained parameter for ~15 B kept expert parameters
    assert by["router_kd"].total < 80e9  # the model in bf16 (61 GB) plus a small router state
    table = memory_table(rows, 80 * 10**9)
    assert "router_kd" in table and table.count("  yes") >= 1 and "moe_kd " in table


def test_layerwise_block_methods_hold_one_layer():
    adapter = _meta("mixtral-8x7b")
    lw = recovery_memory(adapter, method="moe_kd_block", dtype="bfloat16", n_keep=4, execution="layerwise",
                         batch_tokens=512, step_tokens=4096, top_k=64, target_tokens=0)
    per_layer_experts = 8 * 3 * 4096 * 14336
    assert per_layer_experts * 2 < lw.weights < per_layer_experts * 2 * 1.1  # one decoder layer, unpruned
    assert lw.trained_params == 4 * 3 * 4096 * 14336 + 4 * 4096


def _cli(*args):
    from moeprune.cli import _register_commands, cli

    _register_commands()
    return CliRunner().invoke(cli, list(args))


def test_plan_refuses_a_recovery_over_budget_naming_what_fits(tmp_path):
    res = _cli("run", "recipes/general-50.yaml", "-o", str(tmp_path / "o"), "--set", "execution=memory",
               "--set", "max_memory=300MB", "--set", "recover.tokens=2000000")
    assert res.exit_code == 2, res.output
    assert "recover: moe_kd needs about" in res.output and "methods that fit: " in res.output
    assert "router_kd_block" in res.output and not (tmp_path / "o").exists()


# the shared experts' MLP width per MoE layer (DeepSeek-V2-Lite: 2 shared experts of 1408, one MLP of 2816)
SHARED = {"mixtral-8x7b": 0, "qwen3-30b-a3b": 0, "olmoe-1b-7b": 0, "deepseek-v2-lite": 2 * 1408}


@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("name", sorted(REAL))
def test_moe_kd_lora_trains_routers_and_factors_of_every_expert_matrix(name, rank):
    hidden, inter, e, layers = EXPERTS[name]
    keep, shared, d = e // 2, SHARED[name], 2
    adapter = _meta(name)
    mem = recovery_memory(adapter, method="moe_kd", dtype="bfloat16", n_keep=keep, execution="memory",
                          batch_tokens=512, step_tokens=4096, top_k=64, target_tokens=100_000, lora_rank=rank)
    # per kept expert: gate_up (2I, H) and down (H, I) get R x (rows + cols) each; the kept router rows train fully
    routed = keep * rank * ((2 * inter + hidden) + (hidden + inter))
    shared_factors = 3 * rank * (shared + hidden) if shared else 0  # gate_proj, up_proj (S, H) and down_proj (H, S)
    assert mem.method == f"moe_kd+lora r{rank}"
    assert mem.trained_params == layers * (routed + shared_factors + keep * hidden)
    assert mem.state == mem.trained_params * (ADAM_STATE_BYTES + d)
    assert mem.weights == sum(p.numel() for p in adapter.model.parameters()) * d  # as moe_kd: the unpruned model
    assert mem.targets == 100_000 * 64 * 12
    cfg = adapter.config
    batch = 4096 * (cfg.num_hidden_layers * SAVED_PER_LAYER * hidden * d + 12 * cfg.vocab_size)
    # recomputing one layer's W_eff: its adapted tensors in bf16 plus 8 B per element of the largest (gate_up)
    weff = (keep * 3 * hidden * inter + 3 * shared * hidden) * d + keep * 2 * inter * hidden * 8
    assert mem.activations == batch + weff
    full = recovery_memory(adapter, method="moe_kd", dtype="bfloat16", n_keep=keep, execution="memory",
                           batch_tokens=512, step_tokens=4096, top_k=64, target_tokens=100_000)
    assert mem.state < full.state / 20  # a small fraction of full moe_kd's training state


def test_qwen3_30b_moe_kd_lora_fits_one_80_gb_gpu_with_general_50_batches():
    """recipes/general-50.yaml's batches (8 rows x 64 tokens) and tokens (262,144) on Qwen3-30B-A3B at 50%."""
    adapter = _meta("qwen3-30b-a3b")
    kw = dict(dtype="bfloat16", n_keep=64, execution="memory", batch_tokens=512, step_tokens=8 * 64, top_k=64,
              target_tokens=262_144)
    lora = recovery_memory(adapter, method="moe_kd", lora_rank=16, **kw)
    full = recovery_memory(adapter, method="moe_kd", **kw)
    assert lora.total <= 80e9 < full.total
    assert lora.state < 6.5e9 and full.state > 250e9  # 0.32 B vs 14.5 B trained parameters at 18 B each
    table = memory_table([full, lora], 80 * 10**9)
    assert [line.split()[-1] for line in table.splitlines()[1:3]] == ["no", "yes"]


def _config_only(folder, name):
    """A model folder with the real config and one small bf16 tensor (the plan reads the dtype from headers)."""
    from safetensors.torch import save_file

    model_type, numbers = REAL[name]
    folder.mkdir()
    CONFIG_MAPPING[model_type](**numbers, dtype="bfloat16").save_pretrained(folder)
    save_file({"placeholder": torch.zeros(4, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))
    return folder


def _plan(folder, **recover):
    import yaml

    from moeprune.pipeline.plan import make_plan
    from moeprune.pipeline.recipe import Recipe

    raw = yaml.safe_load(open("recipes/general-50.yaml"))
    raw.update(model=str(folder), max_memory="80GB", device="cpu", eval={"tasks": []})
    raw["recover"].update(recover)
    return make_plan(Recipe.model_validate(raw), needs_output=False)


def test_the_plan_takes_qwen3_30b_moe_kd_lora_in_80_gb_and_refuses_full_moe_kd_naming_adapters(tmp_path):
    from moeprune.errors import MoePruneError

    folder = _config_only(tmp_path / "qwen3-30b-a3b", "qwen3-30b-a3b")
    plan = _plan(folder, adapter="lora")
    assert plan.execution == "memory" and "moe_kd+lora r16" in plan.summary()
    row = next(line for line in plan.recovery_memory.splitlines() if line.startswith("moe_kd+lora r16"))
    assert row.endswith("yes")
    with pytest.raises(MoePruneError) as err:
        _plan(folder)
    msg = str(err.value)
    assert "\n" not in msg and "recover: moe_kd needs about" in msg
    assert "moe_kd+lora r16" in msg and "recover.adapter: lora" in msg
    # rank 64: 1.26 B trained parameters, 22.8 GB of state on top of 61 GB in memory; auto streams the bases
    plan = _plan(folder, adapter="lora", rank=64)
    assert plan.execution == "layerwise" and plan.recovery_row.method == "moe_kd+lora r64"
    assert plan.recovery_row.total <= 80 * 10**9 and "moe_kd+lora" in plan.execution_reason


def test_run_dry_run_prints_the_plan_with_the_adapter_row_and_writes_nothing(tmp_path):
    res = _cli("run", "recipes/general-50.yaml", "-o", str(tmp_path / "o"), "--dry-run", "--set", "recover.adapter=lora",
               "--set", "recover.rank=8", "--set", "execution=memory")
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line for line in res.output.splitlines() if line.startswith(("moe_kd", "router_kd"))}
    assert rows["moe_kd+lora"].split()[1] == "r8" and rows["moe_kd+lora"].endswith("yes")
    # the study model at 50%: 4 layers x (16 kept experts x 8 x ((128 + 256) + (256 + 64)) + 16 x 256 router rows)
    assert rows["moe_kd+lora"].split()[2] == f"{4 * (16 * 8 * (384 + 320) + 16 * 256):,}"
    assert not (tmp_path / "o").exists()


def test_plan_refuses_logit_kd_under_layerwise_over_budget_in_one_line(tmp_path):
    from cli_checks import one_error_line

    res = _cli("run", "recipes/general-50.yaml", "-o", str(tmp_path / "o"), "--set", "execution=layerwise",
               "--set", "max_memory=100MB")
    one_error_line(res, "recover: moe_kd needs about", "layer-wise (streamed)", "over the 0.10 GB budget",
                   "methods that fit: router_kd_block, moe_kd_block")
    assert not (tmp_path / "o").exists()


def _mixtral_layer() -> tuple[int, int, int]:
    """Mixtral-8x7B by hand: (parameters of one decoder layer, of its router, outside the decoder layers)."""
    h, inter, e, vocab = 4096, 14336, 8, 32000
    attention = h * h + h * 1024 + h * 1024 + h * h  # q, k, v (8 KV heads of 128), o
    layer = attention + 2 * h + e * h + e * 3 * h * inter  # two norms, router, experts
    return layer, e * h, 2 * vocab * h + h  # embedding, head (untied), final norm


@pytest.mark.parametrize("method", ["router_kd", "moe_kd"])
def test_layerwise_logit_kd_streams_the_frozen_weights(method):
    adapter = _meta("mixtral-8x7b")
    layer, router, outer = _mixtral_layer()
    h, inter, vocab, n_layers, keep, d, tokens = 4096, 14336, 32000, 32, 4, 2, 4096
    lw = recovery_memory(adapter, method=method, dtype="bfloat16", n_keep=keep, execution="layerwise",
                         batch_tokens=512, step_tokens=tokens, top_k=64, target_tokens=100_000)
    mem = recovery_memory(adapter, method=method, dtype="bfloat16", n_keep=keep, execution="memory",
                          batch_tokens=512, step_tokens=tokens, top_k=64, target_tokens=100_000)
    if method == "router_kd":
        trained = n_layers * keep * h
        streamed = layer - router
    else:
        trained = n_layers * (keep * h + keep * 3 * h * inter)
        streamed = layer - router - 8 * 3 * h * inter  # attention and norms
    assert lw.trained_params == trained == mem.trained_params
    teacher, student = 3 * layer * d, trained * d + 3 * streamed * d
    assert lw.weights == outer * d + max(teacher, student)
    assert lw.state == trained * (ADAM_STATE_BYTES + d) == mem.state
    assert lw.activations == tokens * (n_layers * h * d + SAVED_PER_LAYER * h * d + 12 * vocab)
    assert lw.targets == 100_000 * 64 * 12 == mem.targets
    assert lw.total < mem.total
    if method == "router_kd":  # about 13 GB where memory needs the whole 93 GB model
        assert lw.total < 15e9 < 90e9 < mem.total


def _demo_plan(tmp_path, *sets):
    from moeprune.pipeline import load_recipe
    from moeprune.pipeline.plan import make_plan

    return make_plan(load_recipe("recipes/demo-general.yaml", list(sets)), out_dir=tmp_path / "o")


def test_auto_picks_layerwise_logit_kd_only_when_it_fits(tmp_path):
    """The demo model fits in memory, but 2M tokens of teacher targets make moe_kd in memory miss a budget that
    the streamed moe_kd meets: auto goes layer-wise for the recovery; with room it stays in memory; below the
    streamed need it refuses in one line."""
    from cli_checks import one_error_line

    many = "recover.tokens=2000000"
    mem = _demo_plan(tmp_path, "execution=memory", many).recovery_row
    lw = _demo_plan(tmp_path, "execution=layerwise", many).recovery_row
    assert lw.total < mem.total
    between = (lw.total + mem.total) // 2
    plan = _demo_plan(tmp_path, "execution=auto", many, f"max_memory={between}")
    assert plan.execution == "layerwise" and plan.recovery_row == lw
    assert "moe_kd needs" in plan.execution_reason and "layer-wise" in plan.execution_reason
    assert "moe_kd " in plan.summary() and "fits" in plan.summary()
    plan = _demo_plan(tmp_path, "execution=auto", many, f"max_memory={mem.total + 2**30}")  # room: stays in memory
    assert plan.execution == "memory" and plan.recovery_row == mem
    res = _cli("run", "recipes/demo-general.yaml", "-o", str(tmp_path / "x"), "--set", "execution=auto",
               "--set", many, "--set", f"max_memory={lw.total - 1}")
    one_error_line(res, "recover: moe_kd needs about", "layer-wise (streamed)", "methods that fit:")


def test_dry_run_prints_the_plan_and_its_memory_table(tmp_path):
    res = _cli("run", "recipes/demo-general.yaml", "-o", str(tmp_path / "o"), "--set", "execution=layerwise",
               "--dry-run")
    assert res.exit_code == 0, res.output
    assert "execution layerwise" in res.output and "recovery memory per process" in res.output
    assert "moe_kd " in res.output and not (tmp_path / "o").exists()


def test_moe_kd_per_process_under_torchrun_data_parallel_and_sharded_by_hand():
    """Qwen3-30B-A3B at 50% on 8 processes: data-parallel keeps masters and gradients whole (8 + d B) and shards
    Adam's moments (8 / N B); sharded (FSDP2) splits parameters, gradients and moments (16 / N B), gathers two
    blocks at a time (d + 4 B each), and releases the blocks' own weights once their shards exist."""
    from moeprune.recover.memory import SHARDED_STATE_BYTES, ZERO_STATE_BYTES

    adapter = _meta("qwen3-30b-a3b")
    hidden, inter, e, layers = EXPERTS["qwen3-30b-a3b"]
    kw = dict(dtype="bfloat16", n_keep=64, execution="memory", batch_tokens=512, step_tokens=1024, top_k=64,
              target_tokens=131_072, processes=8)
    one = recovery_memory(adapter, method="moe_kd", **{**kw, "processes": 1})
    data = recovery_memory(adapter, method="moe_kd", **kw)
    sharded = recovery_memory(adapter, method="moe_kd", parallel="sharded", **kw)
    per_layer = 64 * 3 * hidden * inter + 64 * hidden  # kept experts and router rows of one MoE layer
    trained = layers * per_layer
    assert one.trained_params == data.trained_params == sharded.trained_params == trained
    assert one.state == trained * (16 + 2)
    assert data.state == trained * (8 + 2) + trained * 8 // 8 and ZERO_STATE_BYTES == 8
    assert sharded.state == trained * 16 // 8 + 2 * per_layer * (2 + 4) and SHARDED_STATE_BYTES == 16
    assert sharded.method == "moe_kd sharded" and sharded.released == trained * 2
    assert sharded.weights == data.weights == one.weights  # the unpruned model, for the teacher's targets
    assert sharded.total == (max(sharded.weights, sharded.weights - trained * 2 + sharded.state)
                             + sharded.activations + sharded.targets)
    assert sharded.total <= 80e9 < 200e9 < data.total < one.total  # only sharded fits an 80 GB GPU of eight
    table = memory_table([data, sharded], 80 * 10**9)
    assert "moe_kd sharded: total = max(weights, weights - 29.00 GB" in table
    with pytest.raises(ValueError, match="sharded recovery applies to moe_kd"):
        recovery_memory(adapter, method="router_kd", parallel="sharded", **kw)


def _shipped(recipe, folder, *sets, processes=None):
    from moeprune.pipeline import load_recipe
    from moeprune.pipeline.plan import make_plan

    return make_plan(load_recipe(recipe, [f"model={folder}", "calibration.spec=recipes/demo.yaml", "eval.tasks=[]",
                                          "device=cpu", *sets]), needs_output=False, processes=processes)


def test_real_model_recipes_carry_recovery_that_fits_80_gb_per_gpu(tmp_path):
    """qwen3-30b-a3b.yaml: moe_kd + LoRA on one 80 GB GPU; qwen3-30b-a3b-8gpu.yaml: full moe_kd sharded over 8;
    mixtral-8x7b.yaml: router_kd streamed layer-wise (the model itself is over 80 GB)."""
    from moeprune.errors import MoePruneError

    qwen = _config_only(tmp_path / "qwen3-30b-a3b", "qwen3-30b-a3b")
    plan = _shipped("recipes/qwen3-30b-a3b.yaml", qwen)
    assert plan.execution == "memory" and plan.recovery_row.method == "moe_kd+lora r16"
    assert plan.recovery_row.total <= plan.max_memory == 80 * 10**9
    plan = _shipped("recipes/qwen3-30b-a3b-8gpu.yaml", qwen, processes=8)
    assert plan.recover_parallel == "sharded" and plan.recovery_row.method == "moe_kd sharded"
    assert plan.recovery_row.total <= 80 * 10**9 and "8 processes, sharded" in plan.summary()
    with pytest.raises(MoePruneError, match="needs about 2[0-9][0-9].[0-9]+ GB per process"):  # data-parallel
        _shipped("recipes/qwen3-30b-a3b-8gpu.yaml", qwen, "recover.parallel=data", processes=8)
    auto = _shipped("recipes/qwen3-30b-a3b-8gpu.yaml", qwen, "recover.parallel=auto", processes=8)
    assert auto.recover_parallel == "sharded"  # data does not fit, so auto shards
    with pytest.raises(MoePruneError) as err:  # one process: the refusal names how many processes would fit
        _shipped("recipes/qwen3-30b-a3b.yaml", qwen, "recover.adapter=none")
    assert "moe_kd sharded in memory over 8 processes" in str(err.value) and "\n" not in str(err.value)
    mixtral = _config_only(tmp_path / "mixtral-8x7b", "mixtral-8x7b")
    plan = _shipped("recipes/mixtral-8x7b.yaml", mixtral)
    assert plan.execution == "layerwise" and plan.recovery_row.method == "router_kd"
    assert plan.recovery_row.total <= 80 * 10**9


def test_the_demo_under_two_processes_stays_data_parallel_when_it_fits(tmp_path):
    plan = _demo_plan_processes(tmp_path, 2)
    assert plan.recover_parallel == "data" and plan.processes == 2
    rows = {line.split()[0] + (" sharded" if "sharded" in line else ""): line
            for line in plan.recovery_memory.splitlines() if line.startswith("moe_kd")}
    assert "moe_kd sharded" in rows  # the alternative is shown
    assert _demo_plan_processes(tmp_path, 1).recover_parallel is None  # one process: nothing to split


def _demo_plan_processes(tmp_path, n, *sets):
    from moeprune.pipeline import load_recipe
    from moeprune.pipeline.plan import make_plan

    return make_plan(load_recipe("recipes/demo-general.yaml", ["execution=memory", *sets]), out_dir=tmp_path / "o",
                     processes=n)


@pytest.mark.parametrize("args,parts", [
    (["--set", "recover.parallel=sharded"], ["recover.parallel: sharded needs several processes", "torchrun"]),
    (["--set", "recover.parallel=sharded", "--set", "recover.method=router_kd", "--set", "recover.steps=5",
      "--dry-run", "--processes", "2"], ["recover.parallel: sharded shards moe_kd's", "router_kd's"]),
    (["--set", "recover.parallel=sharded", "--set", "execution=layerwise", "--dry-run", "--processes", "2"],
     ["recover.parallel: sharded trains the model loaded in memory"]),
    (["--processes", "2"], ["--processes: plans a launch of N processes with --dry-run"]),
])
def test_sharded_recovery_refusals_are_one_line(tmp_path, args, parts):
    from cli_checks import one_error_line

    res = _cli("run", "recipes/demo-general.yaml", "-o", str(tmp_path / "o"), *args)
    one_error_line(res, *parts)
    assert not (tmp_path / "o").exists()


def test_dry_run_with_processes_prints_per_process_rows(tmp_path):
    res = _cli("run", "recipes/demo-general.yaml", "--dry-run", "--processes", "2", "--set", "execution=memory")
    assert res.exit_code == 0, res.output
    assert "2 processes, data" in res.output and "moe_kd sharded" in res.output


def test_sharded_over_too_few_processes_refuses_naming_how_many_fit(tmp_path):
    """Qwen3-30B-A3B's full moe_kd on two 80 GB processes: the model fits in memory, neither data-parallel nor
    sharded training does, and the streamed row is larger still. auto resolves to sharded (the smaller), weighs the
    streamed row without sharding, and refuses in one line naming the eight processes that would fit; so does an
    explicit recover.parallel: sharded."""
    from moeprune.errors import MoePruneError

    qwen = _config_only(tmp_path / "qwen3-30b-a3b", "qwen3-30b-a3b")
    for parallel in ("auto", "sharded"):
        with pytest.raises(MoePruneError) as err:
            _shipped("recipes/qwen3-30b-a3b-8gpu.yaml", qwen, f"recover.parallel={parallel}", processes=2)
        msg = str(err.value)
        assert "recover: moe_kd sharded needs about" in msg and "\n" not in msg
        assert "moe_kd sharded in memory over 8 processes" in msg
