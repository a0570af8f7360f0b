"""The page: Train, Chat, Evaluate and Export tabs, each the twin of a `corral` command.

Handlers turn a `CorralError` into the line the CLI would print (`corral train: error: ...`)
and return it to the page, so bad input never takes the page down.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

from corral.config.parse import build_config, read_yaml
from corral.utils.deps import require
from corral.utils.errors import CorralError
from corral.webui import form, runs, tasks
from corral.webui.i18n import LANGUAGES, t

RUN_KEYS = form.promised_keys() + form.advanced_keys()
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
EVAL_KEYS = ("dataset", "dataset_dir", "max_samples", "task_dir", "n_shot", "max_new_tokens")
REFRESH_SECONDS = 1.5


def cli_error(command: str, exc: Exception) -> str:
    """The message `corral COMMAND` prints for this error (see corral.cli.main)."""
    return f"corral {command}: error: {exc}"


class Labels:
    """Components whose label (or value, for buttons and tabs) changes with the language."""

    def __init__(self, lang: str = "en"):
        self.lang = lang
        self.items: list[tuple[Any, str, str]] = []

    def text(self, key: str) -> str:
        """`key` in the page's starting language."""
        return t(key, self.lang)

    def __call__(self, key: str, component: Any) -> Any:
        import gradio as gr

        # a button shows its value; every other component its label
        self.items.append(
            (component, key, "value" if isinstance(component, gr.Button) else "label")
        )
        return component

    def updates(self, lang: str) -> list[Any]:
        import gradio as gr

        return [gr.update(**{attr: t(key, lang)}) for _, key, attr in self.items]


def build_app(root: str | Path = "saves", lang: str = "en") -> Any:
    """The gradio Blocks of the whole page; runs are recorded under `root/.webui`."""
    gr = require("gradio")
    store = runs.RunStore(root)
    labels = Labels(lang)
    with gr.Blocks(title="corral webui") as app:
        with gr.Row():
            gr.Markdown("## corral webui")
            language = gr.Radio(
                list(LANGUAGES),
                value=next(name for name, code in LANGUAGES.items() if code == lang),
                label=t("language", lang),
                elem_id="language",
            )
        with gr.Tabs():
            with labels("tab_train", gr.Tab(t("tab_train", lang), id="train")):
                _train_tab(gr, store, labels)
            with labels("tab_chat", gr.Tab(t("tab_chat", lang), id="chat")):
                _chat_tab(gr, labels)
            with labels("tab_eval", gr.Tab(t("tab_eval", lang), id="eval")):
                _eval_tab(gr, labels)
            with labels("tab_export", gr.Tab(t("tab_export", lang), id="export")):
                _export_tab(gr, labels)
        components = [item[0] for item in labels.items]
        language.change(lambda name: labels.updates(LANGUAGES[name]), language, components)
    return app


def field_component(gr: Any, key: str, **extra: Any) -> Any:
    """The widget of one config key: its default, allowed values and help from the metadata."""
    spec = form.field_spec(key)
    value = extra.pop("value", spec.default)
    suggestions = extra.pop("suggestions", None)
    common = {"label": key, "info": spec.help, "elem_id": f"field-{key}", "min_width": 220}
    common |= extra
    if key == "template":
        from corral.data.templates.families import template_names

        choices = ["", *template_names()]
        return gr.Dropdown(choices, value=value, allow_custom_value=True, **common)
    if key == "dataset":
        return gr.Dropdown(
            _dataset_names(form.field_spec("dataset_dir").default),
            value=[],
            multiselect=True,
            allow_custom_value=True,
            **common,
        )
    if suggestions is not None:  # known values offered, any other typed value accepted
        return gr.Dropdown(suggestions, value=value, allow_custom_value=True, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if spec.kind in ("choice", "optional_bool"):
        return gr.Dropdown(list(spec.choices), value=value, **common)
    return gr.Textbox(value=value, max_lines=1, **common)


def _dataset_names(dataset_dir: str) -> list[str]:
    from corral.data.registry import registered_names

    try:
        return registered_names(dataset_dir)
    except (CorralError, OSError):
        return []


# ---------------------------------------------------------------- Train


def _train_tab(gr: Any, store: runs.RunStore, labels: Labels) -> None:
    fields: dict[str, Any] = {}
    for section, keys in form.SECTIONS.items():
        accordion = gr.Accordion(labels.text(f"section_{section}"), open=True)
        with labels(f"section_{section}", accordion), gr.Row():
            for key in keys:
                fields[key] = field_component(gr, key, **_suggestions(store, key))
    advanced = gr.Accordion(labels.text("advanced"), open=False, elem_id="advanced")
    with labels("advanced", advanced), gr.Row():
        for key in form.advanced_keys():
            fields[key] = field_component(gr, key)
    inputs = [fields[key] for key in RUN_KEYS]
    with gr.Row():
        preview_data = labels("preview_data", gr.Button(labels.text("preview_data")))
        preview_command = labels("preview_command", gr.Button(labels.text("preview_command")))
        start = labels("start", gr.Button(labels.text("start"), variant="primary", elem_id="start"))
        stop = labels("stop", gr.Button(labels.text("stop"), variant="stop", elem_id="stop"))
        resume = labels("resume", gr.Button(labels.text("resume"), elem_id="resume"))
    with gr.Row():
        config_path = labels(
            "config_path",
            gr.Textbox(label=labels.text("config_path"), max_lines=1, elem_id="config-path"),
        )
        save = labels("save_config", gr.Button(labels.text("save_config"), elem_id="save"))
        load = labels("load_config", gr.Button(labels.text("load_config"), elem_id="load"))
    with gr.Row():
        run = labels(
            "run",
            gr.Dropdown(store.names(), value=None, label=labels.text("run"), elem_id="run"),
        )
        refresh = labels("refresh", gr.Button(labels.text("refresh")))
    message = gr.Markdown(elem_id="train-message")  # what the last button did, or its error
    status = gr.Markdown(elem_id="train-status")  # the chosen run, refreshed by the timer
    command = labels("command", gr.Code(label=labels.text("command"), language="yaml"))
    preview = labels(
        "preview",
        gr.HighlightedText(
            label=labels.text("preview"),
            color_map={"trained": "green", "masked": "gray"},
            elem_id="preview",
        ),
    )
    plot = labels(
        "curve",
        gr.LinePlot(
            x="step", y="value", color="series", label=labels.text("curve"), elem_id="curve"
        ),
    )
    log = labels("log", gr.Textbox(label=labels.text("log"), lines=10, elem_id="log"))

    settled: set[str] = set()  # runs that ended and were drawn (see _tick)
    start.click(lambda *v: _start(store, v, settled), inputs, [message, command, run])
    stop.click(lambda name: _stop(store, name), run, message)
    resume.click(lambda name: _resume(store, name, settled), run, [message, command])
    preview_command.click(lambda *v: _preview_command(store, v), inputs, [message, command])
    preview_data.click(lambda *v: _preview_data(v), inputs, [message, preview])
    save.click(lambda path, *v: _save_config(path, v), [config_path, *inputs], message)
    load.click(lambda path: _load_config(path, len(inputs)), config_path, [message, *inputs])
    watched = [status, plot, log]
    model = fields["model_name_or_path"]
    refresh.click(lambda name: _refresh_runs(store, name), run, [run, model, *watched])
    run.change(lambda name: _show_run(store, name), run, watched)
    fields["dataset_dir"].change(
        lambda d: gr.update(choices=_dataset_names(d)), fields["dataset_dir"], fields["dataset"]
    )
    gr.Timer(REFRESH_SECONDS).tick(lambda name: _tick(store, name, settled), run, watched)


def _suggestions(store: runs.RunStore, key: str) -> dict[str, Any]:
    """Values offered in a dropdown for keys whose values are paths."""
    if key == "model_name_or_path":
        return {"suggestions": store.models()}
    if key in ("adapter_name_or_path", "reward_model"):
        return {"suggestions": [""] + store.outputs()}
    return {}


def _overrides(values: tuple) -> dict[str, Any]:
    return form.overrides_from(dict(zip(RUN_KEYS, values, strict=True)))


def _with_output_dir(overrides: dict[str, Any]) -> dict[str, Any]:
    """A run without an output_dir gets a fresh one, so two runs never write into one folder."""
    if overrides.get("output_dir"):
        return overrides
    config = build_config(overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"saves/{config.method.stage}-{config.method.finetuning_type}-{stamp}"
    return {**overrides, "output_dir": name}


def _yaml_and_command(store: runs.RunStore, overrides: dict[str, Any]) -> str:
    import yaml

    name = runs.run_name(overrides["output_dir"])
    text = yaml.safe_dump(overrides, sort_keys=False, allow_unicode=True)
    return f"# {runs.shown(store.command(name))}\n{text}"


def _start(store: runs.RunStore, values: tuple, settled: set[str]) -> tuple[str, str, Any]:
    import gradio as gr

    try:
        overrides = _with_output_dir(_overrides(values))
    except CorralError as exc:
        return cli_error("train", exc), "", gr.update()
    name = runs.run_name(overrides["output_dir"])
    if name in store.names() and store.state(name).status == "running":
        return f"**{name}** is already running", "", gr.update()
    store.start(name, overrides)
    settled.discard(name)
    text = _yaml_and_command(store, overrides)
    return f"**{name}**: started", text, gr.update(choices=store.names(), value=name)


def _stop(store: runs.RunStore, name: str | None) -> str:
    if name and store.stop(name):
        return f"**{name}**: stopping after this step (a checkpoint is saved)"
    return f"**{name}** is not running"


def _resume(store: runs.RunStore, name: str | None, settled: set[str]) -> tuple[str, str]:
    if not name or name not in store.names():
        return "choose a run to resume", ""
    if store.state(name).status == "running":
        return f"**{name}** is already running", ""
    command = store.resume(name)
    settled.discard(name)
    return f"**{name}**: resumed", runs.shown(command)


def _preview_command(store: runs.RunStore, values: tuple) -> tuple[str, str]:
    try:
        overrides = _with_output_dir(_overrides(values))
    except CorralError as exc:
        return cli_error("train", exc), ""
    pairs = [f"{k}={form.to_text(v)}" for k, v in overrides.items()]
    one_line = runs.shown(["corral", "train", *pairs])
    return "", f"{_yaml_and_command(store, overrides)}\n# or, in one line:\n# {one_line}\n"


def _preview_data(values: tuple) -> tuple[str, list]:
    from corral.webui.preview import preview_examples

    try:
        return "", preview_examples(build_config(_overrides(values)))
    except CorralError as exc:
        return cli_error("train", exc), []


def _save_config(path: str, values: tuple) -> str:
    import yaml

    try:
        overrides = _overrides(values)
        _check_yaml_path(path)
        Path(path).write_text(yaml.safe_dump(overrides, sort_keys=False), encoding="utf-8")
    except (CorralError, OSError) as exc:
        return cli_error("train", exc)
    return f"saved {path}"


def _load_config(path: str, count: int) -> list[Any]:
    import gradio as gr

    try:
        _check_yaml_path(path)
        values = form.values_from_config(read_yaml(path))
    except (CorralError, OSError) as exc:
        return [cli_error("train", exc)] + [gr.update()] * count
    values["dataset"] = [d for d in values["dataset"].split(",") if d]
    return [f"loaded {path}"] + [values[key] for key in RUN_KEYS]


def _check_yaml_path(path: str) -> None:
    if not path or not path.strip().endswith((".yaml", ".yml")):
        raise CorralError(f"'{path}' is not a .yaml config file")


def _refresh_runs(store: runs.RunStore, name: str | None) -> list[Any]:
    import gradio as gr

    names = store.names()
    chosen = name if name in names else (names[0] if names else None)
    models = gr.update(choices=store.models())
    return [gr.update(choices=names, value=chosen), models, *_show_run(store, chosen)]


def _show_run(store: runs.RunStore, name: str | None) -> list[Any]:
    """The run's status line, curve and log tail."""
    return _run_view(store, name)[0]


def _run_view(store: runs.RunStore, name: str | None) -> tuple[list[Any], str | None]:
    """(status line, curve, log tail) of a run, and its status (None: no such run)."""
    if not name or name not in store.names():
        return ["", _curve_frame([]), ""], None
    state = store.state(name)
    line = f"**{name}** — {state.status} — step {state.step}/{state.max_steps}"
    if state.eta_seconds is not None:
        line += f" — ETA {int(state.eta_seconds)} s"
    if state.error:
        line += f"\n\n`{state.error}`"
    return [line, _curve_frame(store.curves(name)), store.log_tail(name)], state.status


def _tick(store: runs.RunStore, name: str | None, settled: set[str]) -> list[Any]:
    """The timer's refresh: a run that has ended is drawn once more, then left alone (redrawing
    an unchanged plot every tick makes it flicker)."""
    import gradio as gr

    if name in settled:
        return [gr.skip()] * 3
    shown, status = _run_view(store, name)
    if status not in (None, "running"):
        settled.add(name)
    return shown


def _curve_frame(rows: list[dict[str, Any]]) -> Any:
    """The plot's table; series is text even when empty (else the plot takes it for numbers)."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "string"})


# ---------------------------------------------------------------- Chat


class ChatSession:
    """The loaded engine (one per server: the page is a local, single-user tool)."""

    def __init__(self):
        self.engine = None
        self.stop = threading.Event()


def _chat_tab(gr: Any, labels: Labels) -> None:
    session = ChatSession()
    with gr.Row():
        model = field_component(gr, "model_name_or_path", elem_id="chat-model")
        adapter = field_component(gr, "adapter_name_or_path", elem_id="chat-adapter")
        template = field_component(gr, "template", elem_id="chat-template")
        system = field_component(gr, "default_system", elem_id="chat-system")
    with gr.Row():
        sampling = [field_component(gr, key, elem_id=f"chat-{key}") for key in GENERATION_KEYS]
    load = labels("load_model", gr.Button(labels.text("load_model"), elem_id="chat-load"))
    status = gr.Markdown(elem_id="chat-status")
    chatbot = gr.Chatbot(elem_id="chatbot", height=300)
    message = labels("message", gr.Textbox(label=labels.text("message"), elem_id="chat-message"))
    with gr.Row():
        send = labels(
            "send", gr.Button(labels.text("send"), variant="primary", elem_id="chat-send")
        )
        stop = labels("chat_stop", gr.Button(labels.text("chat_stop"), elem_id="chat-stop"))
        clear = labels("clear", gr.Button(labels.text("clear"), elem_id="chat-clear"))
    load.click(lambda *v: _load_engine(session, *v), [model, adapter, template, system], status)
    send.click(
        functools.partial(_reply, session),  # a generator function: gradio streams it
        [message, chatbot, *sampling],
        [chatbot, message, status],
    )
    stop.click(session.stop.set)
    clear.click(lambda: ([], ""), None, [chatbot, status])


def _load_engine(session: ChatSession, model: str, adapter: str, template: str, system: str) -> str:
    from corral.infer.engine import ChatEngine

    # an output folder of a LoRA run is an adapter: it brings its base model and template
    if model.strip() and not adapter.strip() and (Path(model) / "adapter_config.json").is_file():
        model, adapter = "", model
    raw = {"model_name_or_path": model.strip() or "default", "adapter_name_or_path": adapter}
    raw |= {"template": template or None, "default_system": system or None}
    try:
        config = build_config(raw)
        session.engine = None
        session.engine = ChatEngine(config.model, config.generation)
    except (CorralError, OSError) as exc:
        return cli_error("chat", exc)
    engine = session.engine
    return f"loaded {engine.model_config.model_name_or_path} ({engine.template.name} template)"


def _reply(session: ChatSession, text: str, history: list, *sampling: str):
    history = list(history or [])
    if session.engine is None:
        yield history, text, "load a model first"
        return
    try:
        settings = build_config(
            form.overrides_from(dict(zip(GENERATION_KEYS, sampling, strict=True)))
        )
    except CorralError as exc:
        yield history, text, cli_error("chat", exc)
        return
    overrides = {key: getattr(settings.generation, key) for key in GENERATION_KEYS}
    messages = [{"role": m["role"], "content": _plain(m["content"])} for m in history]
    messages.append({"role": "user", "content": text})
    history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    session.stop.clear()
    try:
        for piece in session.engine.stream(messages, stop_event=session.stop, **overrides):
            history[-1]["content"] += piece
            yield history, "", ""
    except CorralError as exc:
        yield history[:-2], text, cli_error("chat", exc)


def _plain(content: Any) -> str:
    """A chatbot message's text (gradio may hand content back as a list of parts)."""
    if isinstance(content, list):
        return "".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return str(content)


# ---------------------------------------------------------------- Evaluate


def _eval_tab(gr: Any, labels: Labels) -> None:
    with gr.Row():
        kind = labels(
            "eval_kind",
            gr.Radio(
                ["generate", "ppl", "mc"],
                value="ppl",
                label=labels.text("eval_kind"),
                elem_id="eval-kind",
            ),
        )
        model = field_component(gr, "model_name_or_path", elem_id="eval-model")
        adapter = field_component(gr, "adapter_name_or_path", elem_id="eval-adapter")
    with gr.Row():
        values = [field_component(gr, key, elem_id=f"eval-{key}") for key in EVAL_KEYS]
        output = labels(
            "eval_output",
            gr.Textbox(label=labels.text("eval_output"), max_lines=1, elem_id="eval-output"),
        )
    run = labels(
        "eval_run", gr.Button(labels.text("eval_run"), variant="primary", elem_id="eval-run")
    )
    command = gr.Code(language="shell", elem_id="eval-command")
    metrics = labels("metrics", gr.Markdown(elem_id="eval-metrics"))
    predictions = labels("predictions", gr.JSON(label=labels.text("predictions")))
    with gr.Row():
        first = labels(
            "compare_a",
            gr.Textbox(label=labels.text("compare_a"), max_lines=1, elem_id="compare-a"),
        )
        second = labels(
            "compare_b",
            gr.Textbox(label=labels.text("compare_b"), max_lines=1, elem_id="compare-b"),
        )
        compare = labels("compare", gr.Button(labels.text("compare"), elem_id="compare"))
    comparison = gr.Markdown(elem_id="compare-table")
    run.click(_evaluate, [kind, model, adapter, output, *values], [command, metrics, predictions])
    compare.click(_compare, [first, second], comparison)


def _evaluate(kind: str, model: str, adapter: str, output: str, *values: str):
    keyed = dict(zip(EVAL_KEYS, values, strict=True))
    keyed |= {"model_name_or_path": model, "adapter_name_or_path": adapter, "save_dir": output}
    command = tasks.eval_command(kind, keyed)
    ok, text = tasks.run_cli(command)
    if not ok:
        return runs.shown(command), f"`{text}`", None
    return runs.shown(command), text, tasks.first_predictions(output)


def _compare(first: str, second: str) -> str:
    ok, text = tasks.run_cli(["corral", "eval", "compare", first.strip(), second.strip()])
    return text if ok else f"`{text}`"


# ---------------------------------------------------------------- Export


def _export_tab(gr: Any, labels: Labels) -> None:
    with gr.Row():
        model = field_component(gr, "model_name_or_path", value="", elem_id="export-model")
        adapter = field_component(gr, "adapter_name_or_path", elem_id="export-adapter")
        output = labels(
            "export_output",
            gr.Textbox(label=labels.text("export_output"), max_lines=1, elem_id="export-output"),
        )
    with gr.Row():
        fmt = labels(
            "export_format",
            gr.Radio(
                ["hf", "gguf"],
                value="hf",
                label=labels.text("export_format"),
                elem_id="export-format",
            ),
        )
        quant = labels(
            "export_quant",
            gr.Dropdown(
                list(tasks.QUANTS),
                value="f16",
                label=labels.text("export_quant"),
                elem_id="export-quant",
            ),
        )
        overwrite = labels(
            "overwrite", gr.Checkbox(label=labels.text("overwrite"), elem_id="export-overwrite")
        )
    run = labels(
        "export_run", gr.Button(labels.text("export_run"), variant="primary", elem_id="export-run")
    )
    command = gr.Code(language="shell", elem_id="export-command")
    result = gr.Markdown(elem_id="export-result")
    run.click(_export, [model, adapter, output, fmt, quant, overwrite], [command, result])


def _export(model: str, adapter: str, output: str, fmt: str, quant: str, overwrite: bool):
    if not output.strip():
        return (
            "",
            "`corral export: error: invalid configuration:\n  - corral export needs --output`",
        )
    command = tasks.export_command(model, adapter, output, fmt, quant, overwrite)
    ok, text = tasks.run_cli(command)
    if not ok:
        return runs.shown(command), f"`{text}`"
    size = tasks.human_size(tasks.size_of(output))
    files = sorted(p.name for p in Path(output).iterdir()) if Path(output).is_dir() else [output]
    return runs.shown(command), f"**{output}**: {size}\n\n" + json.dumps(files)
