"""Training on a tiny random Llama: loss falls, the right parameters change, gradient
accumulation and resume are exact, outputs describe themselves and reload without corral."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from corral.config import load_config
from corral.train import callbacks
from corral.train.workflow import run_training
from corral.utils.errors import CorralError

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cows say?", "Cows say moo."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
]


@pytest.fixture
def sft_file(tmp_path) -> Path:
    path = tmp_path / "qa.json"
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def pt_file(tmp_path) -> Path:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(f"{q} {a}" for q, a in QA * 2) + "\n")
    return path


def _config(tiny_llama_dir, data_file, out, *extra: str):
    return load_config(
        None,
        [
            f"model_name_or_path={tiny_llama_dir}",
            f"dataset={data_file}",
            f"output_dir={out}",
            "template=chatml",
            "cutoff_len=64",
            "per_device_train_batch_size=4",
            "learning_rate=3e-3",
            "lr_scheduler_type=constant",
            "logging_steps=5",
            "save_steps=1000",
            "stop_check_samples=0",
            "seed=0",
            *extra,
        ],
    )


def _losses(out: Path) -> list[float]:
    lines = (out / callbacks.LOG_FILE).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.parametrize(
    ("stage", "method"),
    [
        ("sft", "lora"),
        ("sft", "full"),
        ("sft", "freeze"),
        ("pt", "lora"),
        ("pt", "full"),
        ("pt", "freeze"),
    ],
)
def test_loss_falls_over_30_steps(learnable_tiny_dir, sft_file, pt_file, tmp_path, stage, method):
    data = sft_file if stage == "sft" else pt_file
    # A tiny random model learns slowly through rank-8 LoRA: give it a large step.
    extra = ["learning_rate=1e-2" if method == "lora" else "learning_rate=3e-3"]
    if method == "freeze":
        extra.append("freeze_trainable_layers=1")
    out = tmp_path / "out"
    metrics = run_training(
        _config(
            learnable_tiny_dir,
            data,
            out,
            f"stage={stage}",
            f"finetuning_type={method}",
            "max_steps=30",
            *extra,
        )
    )
    losses = _losses(out)
    assert len(losses) == 6
    assert losses[-1] < 0.2 * losses[0], losses  # from ~uniform (ln 49152) towards memorised
    assert metrics["real_tokens_per_second"] > 0
    assert metrics["train_loss"] > 0


def test_freeze_trains_only_the_chosen_blocks(tiny_llama_dir, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_training(
        _config(
            tiny_llama_dir,
            sft_file,
            out,
            "finetuning_type=freeze",
            "freeze_trainable_layers=1",
            "max_steps=3",
        )
    )
    before = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    after = load_file(out / "model.safetensors")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, "nothing trained"
    assert all(k.startswith("model.layers.1.") for k in changed), changed
    assert any(k.startswith("model.layers.1.mlp") for k in changed)


def test_lora_output_reloads_with_plain_peft(tiny_llama_dir, sft_file, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "out"
    run_training(
        _config(
            tiny_llama_dir,
            sft_file,
            out,
            "max_steps=4",
            "logging_steps=2",
            "plot_loss=true",
            "lora_rank=4",
        )
    )
    files = {p.name for p in out.iterdir()}
    expected = {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "corral_run.json",
        "corral_config.yaml",
        "train_results.json",
        "trainer_log.jsonl",
        "training_loss.png",
    }
    assert expected <= files, expected - files
    info = json.loads((out / "corral_run.json").read_text())
    assert info["template"] == "chatml" and info["stage"] == "sft"
    results = json.loads((out / "train_results.json").read_text())
    for key in ("train_runtime", "train_loss", "real_tokens_per_second", "peak_memory_mb"):
        assert key in results
    model = AutoPeftModelForCausalLM.from_pretrained(out)  # no corral involved
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices are still zero"
    from transformers import AutoTokenizer

    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template


def test_rslora_with_a_trained_embedding_saves_both(tiny_llama_dir, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    extra = ("max_steps=2", "use_rslora=true", "additional_target=embed_tokens")
    run_training(_config(tiny_llama_dir, sft_file, out, *extra))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["modules_to_save"] == ["embed_tokens"]
    saved = load_file(out / "adapter_model.safetensors")
    [name] = [n for n in saved if "embed_tokens" in n]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_input_embeddings().weight
    assert saved[name].shape == base.shape and not torch.equal(saved[name], base)


def test_gradient_accumulation_matches_one_large_batch(tiny_llama_dir, sft_file, tmp_path):
    weights = []
    for batch, accumulation in ((8, 1), (2, 4)):
        out = tmp_path / f"b{batch}"
        run_training(
            _config(
                tiny_llama_dir,
                sft_file,
                out,
                "finetuning_type=full",
                "optim=sgd",
                "learning_rate=1.0",
                "max_grad_norm=0",
                "max_steps=1",
                "logging_steps=1",
                f"per_device_train_batch_size={batch}",
                f"gradient_accumulation_steps={accumulation}",
            )
        )
        weights.append(load_file(out / "model.safetensors"))
        weights[-1]["loss"] = torch.tensor(_losses(out)[0])
    # One SGD step with lr 1 moves every weight by exactly its gradient.
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


def test_resume_after_ctrl_c_matches_uninterrupted_run(
    tiny_llama_dir, sft_file, tmp_path, monkeypatch
):
    args = ("max_steps=8", "save_steps=4")
    run_training(_config(tiny_llama_dir, sft_file, tmp_path / "full", *args))

    original = callbacks.InterruptCallback.on_step_end

    def press_ctrl_c_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            self.interrupted = True
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(callbacks.InterruptCallback, "on_step_end", press_ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_training(_config(tiny_llama_dir, sft_file, tmp_path / "cut", *args))
    assert (tmp_path / "cut" / "checkpoint-3").is_dir()
    monkeypatch.setattr(callbacks.InterruptCallback, "on_step_end", original)
    run_training(
        _config(tiny_llama_dir, sft_file, tmp_path / "cut", *args, "resume_from_checkpoint=true")
    )

    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-5)


def test_non_empty_output_dir_is_refused(tiny_llama_dir, sft_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CorralError, match="is not empty; set overwrite_output_dir=true"):
        run_training(_config(tiny_llama_dir, sft_file, out, "max_steps=1"))
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_run_that_failed_before_training_can_be_rerun(tiny_llama_dir, sft_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CorralError, match="missing.json"):
        run_training(_config(tiny_llama_dir, tmp_path / "missing.json", out, "max_steps=1"))
    run_training(_config(tiny_llama_dir, sft_file, out, "max_steps=1"))  # no overwrite needed
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_without_checkpoint_is_an_error(tiny_llama_dir, sft_file, tmp_path):
    with pytest.raises(CorralError, match="holds no checkpoint-N folder"):
        run_training(
            _config(tiny_llama_dir, sft_file, tmp_path / "none", "resume_from_checkpoint=true")
        )


def test_validation_loss_is_logged(tiny_llama_dir, sft_file, tmp_path):
    out = tmp_path / "out"
    run_training(
        _config(tiny_llama_dir, sft_file, out, "max_steps=4", "val_size=2", "eval_steps=2")
    )
    lines = [json.loads(x) for x in (out / callbacks.LOG_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines if "eval_loss" in x] == [2, 4]


def test_default_system_is_trained_recorded_and_served(
    tiny_llama_dir, sft_file, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    from corral.config.fields import ModelConfig
    from corral.data.templates import encode_turns
    from corral.infer.engine import ChatEngine
    from corral.train import workflow

    seen = []
    build = workflow.build_dataset
    monkeypatch.setattr(
        workflow, "build_dataset", lambda *a, **k: seen.append(a[2]) or build(*a, **k)
    )
    out = tmp_path / "out"
    run_training(_config(tiny_llama_dir, sft_file, out, "max_steps=1", "default_system=Be Zed."))
    [template] = seen
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    turns = encode_turns(
        template,
        tokenizer,
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    )
    assert "Be Zed." in tokenizer.decode(turns[0][0])
    assert json.loads((out / "corral_run.json").read_text())["default_system"] == "Be Zed."
    engine = ChatEngine(
        ModelConfig(model_name_or_path=str(tiny_llama_dir), adapter_name_or_path=[str(out)])
    )
    prompt = tokenizer.decode(engine.prompt_ids([{"role": "user", "content": "hi"}]))
    assert "Be Zed." in prompt and "<|im_start|>" in prompt  # the recorded template too


def test_stop_rate_is_reported_and_warns(tiny_llama_dir, sft_file, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    logging.getLogger("corral").addHandler(caplog.handler)  # corral's logger does not propagate
    try:
        out = tmp_path / "out"
        metrics = run_training(
            _config(tiny_llama_dir, sft_file, out, "max_steps=1", "stop_check_samples=3")
        )
    finally:
        logging.getLogger("corral").removeHandler(caplog.handler)
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["stop_rate_samples"] == metrics["stop_rate_samples"] == 3
    # one step on a random model: its greedy replies never reach the end-of-turn token
    assert saved["stop_rate"] == metrics["stop_rate"] == 0.0
    assert "stop rate: 0% of 3 greedy replies" in caplog.text
    assert "the tuned model often does not stop" in caplog.text


def test_stop_check_replies_fit_the_model_context(tiny_llama_dir, tmp_path):
    """A reply budget of twice a long reference (cutoff_len 512, the tiny model's whole
    context) is capped by the context: the run finishes instead of failing after training."""
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": "Say more.", "output": "word " * 300}] * 4))
    out = tmp_path / "out"
    metrics = run_training(
        _config(tiny_llama_dir, data, out, "max_steps=1", "cutoff_len=512", "stop_check_samples=2")
    )
    assert metrics["stop_rate_samples"] == 2 and metrics["stop_rate"] == 0.0


def test_a_new_adapter_on_an_sft_adapter_loads_with_it(tiny_llama_dir, sft_file, tmp_path):
    """create_new_adapter merges the sft adapter and trains a new one; naming the new adapter
    alone loads the chain (its run info records the adapter under it), as training saw it."""
    from corral.config.fields import ModelConfig
    from corral.model.load import load_model

    sft, top = tmp_path / "sft", tmp_path / "top"
    run_training(_config(tiny_llama_dir, sft_file, sft, "max_steps=3", "lora_rank=4"))
    run_training(
        _config(
            tiny_llama_dir,
            sft_file,
            top,
            "max_steps=3",
            "lora_rank=4",
            f"adapter_name_or_path={sft}",
            "create_new_adapter=true",
        )
    )
    info = json.loads((top / "corral_run.json").read_text())
    assert info["base_adapters"] == [str(sft.resolve())]
    ids = torch.tensor([[5, 17, 42, 7, 99]])

    def logits(*adapters):
        config = ModelConfig(str(tiny_llama_dir), adapter_name_or_path=list(adapters), device="cpu")
        model, _ = load_model(config)
        return model(ids).logits

    alone, chain = logits(str(top)), logits(str(sft), str(top))
    assert torch.allclose(alone, chain, atol=1e-6)
    assert not torch.allclose(alone, logits(str(sft)), atol=1e-4)  # the new adapter counts
