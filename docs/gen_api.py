"""Regenerate docs/api.md from the docstrings of LogIX's public API.

    python docs/gen_api.py          # rewrite docs/api.md
    python docs/gen_api.py --check  # exit 1 if docs/api.md is stale (a test runs this)
"""

import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (heading, object path) in reading order; methods of a class are listed under it.
SECTIONS = [
    ("Starting a run", ["logix.init", "logix.get_run", "logix.load_config", "logix.frozen"]),
    ("Run", ["logix.Run", "logix.mode.Mode"]),
    ("Query results", ["logix.StepRows", "logix.Scores"]),
    ("Attributor (scoring a saved log)", ["logix.Attributor"]),
    ("Influence estimators", ["logix.influence.lissa.lissa", "logix.MagicRecorder",
                              "logix.magic_scores"]),
    ("Reading logs", ["logix.storage.reader.LogReader", "logix.storage.scores.load_scores",
                      "logix.storage.scores.open_scores", "logix.storage.scores.save_scores"]),
    ("Language models", ["logix.text.query_log", "logix.text.token_influence",
                         "logix.text.print_heatmap", "logix.text.heatmap_html",
                         "logix.text.heatmap_png", "logix.text.check_consistency"]),
    ("Integrations", ["logix.LogIXScheduler", "logix.integrations.huggingface.LogIXCallback",
                      "logix.integrations.huggingface.extract_log",
                      "logix.integrations.huggingface.influence_of",
                      "logix.integrations.lightning.LogIXCallback"]),
    ("Evaluation", ["logix.evaluation.make_subsets", "logix.evaluation.lds",
                    "logix.evaluation.linear_datamodeling_score", "logix.evaluation.brittleness",
                    "logix.evaluation.choose_damping", "logix.evaluation.DampingChoice",
                    "logix.evaluation.align_scores", "logix.evaluation.save_results",
                    "logix.evaluation.load_results"]),
    ("Dashboard", ["logix.dashboard.make_server", "logix.dashboard.serve",
                   "logix.dashboard.build_report", "logix.storage.content.load_content"]),
    ("Coming from LogIX 0.1 (logix.compat)", ["logix.compat.RunNames",
                                               "logix.compat.AttributorNames"]),
    ("Export to experiment trackers", ["logix.export.to_tensorboard", "logix.export.to_mlflow",
                                       "logix.export.to_wandb", "logix.export.collect",
                                       "logix.export.write"]),
]


def resolve(path):
    module_name, _, attr = path.rpartition(".")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def signature(obj) -> str:
    try:
        return str(inspect.signature(obj)).replace("'", "")  # postponed annotations are strings
    except (TypeError, ValueError):
        return "(...)"


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py`; a test keeps it current.",
             ""]
    for heading, paths in SECTIONS:
        lines += [f"## {heading}", ""]
        for path in paths:
            obj = resolve(path)
            name = path.split(".")[-1]
            lines += [f"### `{path}{signature(obj) if not inspect.isclass(obj) else ''}`", "",
                      inspect.getdoc(obj) or "(no docstring)", ""]
            if inspect.isclass(obj):
                for method_name, method in inspect.getmembers(obj, inspect.isfunction):
                    if method_name.startswith("_") and method_name != "__call__":
                        continue
                    owner = method.__qualname__.rpartition(".")[0]  # "" for a function
                    if owner and owner != obj.__name__:  # bound from its room (resource_plan)
                        continue
                    doc = inspect.getdoc(method)
                    if not doc:
                        continue
                    lines += [f"#### `{name}.{method_name}{signature(method)}`", "", doc, ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    target = os.path.join(HERE, "api.md")
    text = render()
    if "--check" in sys.argv:
        current = open(target).read() if os.path.exists(target) else ""
        if current != text:
            print("docs/api.md is stale: run `python docs/gen_api.py`.")
            return 1
        return 0
    with open(target, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
