"""The page's own words in English and Chinese. Config keys keep their names (they are what
YAML files and `key=value` overrides use); their help text is the config's, in English."""

from __future__ import annotations

LANGUAGES = {"English": "en", "中文": "zh"}

TEXT = {
    "language": ("Language", "语言"),
    "tab_train": ("Train", "训练"),
    "tab_chat": ("Chat", "对话"),
    "tab_eval": ("Evaluate", "评估"),
    "tab_export": ("Export", "导出"),
    "section_model": ("Model", "模型"),
    "section_method": ("Method", "方法"),
    "section_data": ("Data", "数据"),
    "section_hyper": ("Hyper-parameters", "超参数"),
    "advanced": ("Advanced (every other config key)", "高级（其余所有配置项）"),
    "preview_data": ("Preview dataset", "预览数据"),
    "preview_command": ("Preview command", "预览命令"),
    "config_path": ("Config file (.yaml)", "配置文件（.yaml）"),
    "save_config": ("Save config", "保存配置"),
    "load_config": ("Load config", "加载配置"),
    "start": ("Start", "开始"),
    "stop": ("Stop (save a checkpoint)", "停止（保存检查点）"),
    "resume": ("Resume", "继续训练"),
    "run": ("Run", "训练任务"),
    "refresh": ("Refresh", "刷新"),
    "command": ("Command and YAML", "命令与 YAML"),
    "preview": ("Trained tokens vs masked tokens", "参与训练的 token 与被掩码的 token"),
    "curve": ("Loss (and reward) by step", "各步的损失（及奖励）"),
    "log": ("Log", "日志"),
    "load_model": ("Load model", "加载模型"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "chat_stop": ("Stop", "停止"),
    "eval_kind": ("Evaluation", "评估类型"),
    "eval_run": ("Run evaluation", "运行评估"),
    "eval_output": ("Output folder", "输出目录"),
    "metrics": ("Metrics", "指标"),
    "predictions": ("First predictions", "前几条预测"),
    "compare_a": ("Evaluation folder A", "评估目录 A"),
    "compare_b": ("Evaluation folder B", "评估目录 B"),
    "compare": ("Compare", "对比"),
    "export_output": ("Output (folder, or .gguf file)", "输出（目录或 .gguf 文件）"),
    "export_format": ("Format", "格式"),
    "export_quant": ("GGUF quantisation", "GGUF 量化"),
    "overwrite": ("Replace an existing output", "覆盖已有输出"),
    "export_run": ("Export", "导出"),
    "result": ("Result", "结果"),
    "status": ("Status", "状态"),
}


def t(key: str, lang: str) -> str:
    """The text `key` in language `lang` ("en" or "zh")."""
    english, chinese = TEXT[key]
    return chinese if lang == "zh" else english
