"""The `msr` command line (typer): one app for every command.

Layout: :mod:`.common` (console, ``--config`` / ``--set`` options, run lock, library output),
:mod:`.run` (`run`, `recommend`, `chat`, `web`, `config`), :mod:`.data` (`msr data`),
:mod:`.prompts` (`msr prompts`), :mod:`.finetune` (`msr finetune align | sft ...`); `msr eval` is
and `msr report` are in :mod:`.eval`, `msr preset` in :mod:`.preset`. Every command takes ``--config FILE`` and
``--set key=value``; ``msr --verbose`` shows the libraries' own logs and progress bars.
"""
from __future__ import annotations

import typer

from mllm_msr.cli import data, finetune, preset, prompts, run
from mllm_msr.cli import eval as eval_
from mllm_msr.cli.common import ConfigOpt, SetOpt, console, library_output, run_lock

__all__ = ["ConfigOpt", "SetOpt", "app", "console", "main", "run_lock"]

app = typer.Typer(help="mllm-msr: multimodal sequential recommendation with (M)LLMs.", no_args_is_help=True)
app.add_typer(data.app, name="data")
app.add_typer(prompts.app, name="prompts")
app.add_typer(finetune.app, name="finetune")
app.add_typer(preset.app, name="preset")
app.command("run")(run.run)
app.command("recommend")(run.recommend)
app.command("config")(run.config_cmd)
app.command("chat")(run.chat)
app.command("web")(run.web)
app.command("eval")(eval_.eval_cmd)
app.command("report")(eval_.report_cmd)

@app.callback()
def _global_options(verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show the libraries' own logs, warnings and progress bars "
                                       "(transformers, huggingface_hub, vLLM); hidden by default.")) -> None:
    library_output(verbose)


def main() -> None:  # pragma: no cover
    app()
