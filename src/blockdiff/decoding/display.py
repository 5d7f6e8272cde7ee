"""Live terminal view of the canvas: masked positions, tokens appearing and being revised."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.text import Text

from ..tokenizer import Tokenizer
from .canvas import Canvas


class LiveCanvas:
    """Call with the canvas after each step; shows row 0."""

    def __init__(self, tok: Tokenizer, console: Console | None = None, prompt: str | None = None):
        """`prompt`: what to show for the prompt (e.g. the question without its chat template)."""
        self.tok, self.prompt = tok, prompt
        self.console = console or Console()
        self.live = Live(Text(""), console=self.console, refresh_per_second=20, transient=False)
        self.live.start()

    def __call__(self, c: Canvas) -> None:
        r = 0
        text = Text()
        if self.prompt is not None:
            text.append(self.prompt + "\n", style="bold")
        else:
            g = int(c.start[r])
            text.append(self.tok.decode(c.tokens[r, :g][c.valid[r, :g]].tolist()), style="bold")
        cols = range(int(c.start[r]), min(int(c.eos_at[r]) + 1, c.T))
        last = int(c.commit_step[r].max())
        for j in cols:
            if not c.valid[r, j]:
                continue
            if c.masked[r, j]:
                text.append("░", style="dim")
                continue
            s = self.tok.decode([int(c.tokens[r, j])], skip_special=False)
            style = "bold green" if int(c.commit_step[r, j]) == last else ""
            text.append(s, style=style)
        text.append(f"\n[step {c.step} · NFE {int(c.nfe[r])}]", style="dim")
        self.live.update(text)

    def close(self) -> None:
        self.live.stop()
