"""`dlp-deploy generate`: greedy text from a deployment folder, streamed as it is decoded."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse phones home on import otherwise

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from ..runtime.deployment import load_deployment  # noqa: E402
from ..runtime.engines import ENGINES  # noqa: E402
from ..runtime.worker import run_in_worker, workaround  # noqa: E402

err = Console(stderr=True)


def generate_cmd(
    deploy_dir: Annotated[Path, typer.Argument(help="folder made by `dlp-deploy export`")],
    prompt: Annotated[str, typer.Option("--prompt", help="text to continue")],
    engine: Annotated[str, typer.Option("--engine", help="onnxruntime, deepsparse (engine-internal KV cache), deepsparse-external, "
                                                     "openvino (ONNX folders) or llamacpp (GGUF folders)")] =
        "deepsparse",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    num_cores: Annotated[Optional[int], typer.Option("--num-cores", help="CPU cores (default: all)")] = None,
) -> None:
    """Stream greedy text from a deployment folder through the project's KV-cache loop."""
    deployment = load_deployment(deploy_dir)
    ENGINES[engine]  # an unknown or missing engine answers here, before a worker starts
    deployment.check_engine(engine)
    tokenizer = deployment.tokenizer()
    prompt_ids = tokenizer(prompt)["input_ids"]
    stream = TextStream(tokenizer)
    status = err.status(f"compiling for {engine}")
    status.start()

    def on_event(event: dict) -> None:
        status.stop()  # compiled: the tokens follow
        if "token" in event:
            stream.push(event["token"])

    try:
        result = run_in_worker("generate", {"deploy_dir": str(deploy_dir), "engine": engine, "num_cores": num_cores,
                                            "prompt_ids": prompt_ids, "max_new_tokens": max_new_tokens,
                                            "stop_ids": [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                            else []},
                               engine=engine, label=deployment.folder.name, during="generation", on_event=on_event,
                               hint=workaround(engine, "choose another --engine"))
    finally:
        status.stop()
    stream.close()
    rate = result["decode_tokens_per_s"]
    err.print(f"[dim]{result['tokens']} tokens; prefill {len(prompt_ids)} tokens {result['prefill_s'] * 1e3:.1f} ms; "
              f"decode {rate:.1f} tokens/s[/]" if rate else f"[dim]{result['tokens']} tokens[/]", highlight=False)


class TextStream:
    """Writes decoded text as tokens arrive; decodes the whole continuation so multi-byte characters come out whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], 0

    def push(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)

    def close(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        sys.stdout.write(text[self.printed:] + "\n")
        sys.stdout.flush()


COMMANDS = {"generate": generate_cmd}
