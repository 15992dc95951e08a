"""ToolSession: a tool-using agent's conversation as its chat template renders it, against what its branch holds;
tool_format: the checks before a pipeline with tools runs.

Each round the whole conversation (system, user turn, assistant calls, tool results) is rendered by the
model's own template; the branch already holds the text up to the end of the last reply, so only the
rendering's suffix is appended (the reply's turn end, the tool messages, the next assistant header).
NOTE: a template may re-render an earlier part differently (a call's JSON written with other spacing or
key order than the model wrote it, a special token the text does not show): the branch then no longer
holds a prefix of the rendering. Rather than send the model a prompt the template would not give, the
caller re-forks the snapshot and computes the agent's part again (recorded as recomputed tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import KvforkError, ToolError
from kvfork.pipeline.agent import Agent
from kvfork.pipeline.definition import Pipeline
from kvfork.pipeline.result import ToolRound, ToolUse
from kvfork.pipeline.tools import run_call
from kvfork.prompt import ChatLayout
from kvfork.result import Completion
from kvfork.toolcalls import FORMATS, ToolCall, ToolFormat, format_for

if TYPE_CHECKING:
    from kvfork.runtime import Engine

__all__ = ["FollowUp", "ToolSession", "tool_format"]


def tool_format(engine: Engine, pipeline: Pipeline, reuse: bool) -> ToolFormat | None:
    """The format the pipeline's agents with tools are read in (None: it has none), checked before
    anything runs: they need a template that lays tools out, and no reuse mode (`reuse`)."""
    users = [a.name for a in pipeline.agents if a.uses_tools]
    if not users:
        return None
    if reuse:
        raise ToolError(f"agents with tools ({', '.join(users)}) cannot run under a reuse mode yet; run"
                        " them with reuse='exact'")
    model = engine.model
    fmt = format_for(model.chat_template) if getattr(model, "knows_tools", False) else None
    if fmt is None:
        raise ToolError(f"agent {users[0]!r} has tools, but the chat template of {engine.model_path.name} has no"
                        " place for tools or no tool-call format kvfork parses (it parses:"
                        f" {', '.join(f.name for f in FORMATS)}); use a model whose template knows tools,"
                        " e.g. qwen2.5-coder-0.5b")
    model.show_special([fmt.open, fmt.close])  # NOTE: the parser must see the call markers in the text
    return fmt


@dataclass(frozen=True)
class FollowUp:
    """What the branch is sent for the next round: `tokens` (the text of `text`), and whether it must be
    forked again from its snapshot first (`refork`: the text then starts right after the snapshot)."""

    text: str
    tokens: list[int]
    refork: bool


class ToolSession:
    """One agent's tool conversation: messages for the template, the text its branch holds, its rounds."""

    def __init__(self, engine: Engine, agent: Agent, fmt: ToolFormat, document: str | None, system: str | None):
        self.engine = engine
        self.agent = agent
        self.fmt = fmt
        self.tools = {t.name: t for t in agent.tool_list}
        # NOTE: the same definitions its snapshot was rendered with (agents share one only when these are equal)
        self.definitions: list[dict[str, Any]] = agent.tool_definitions or []
        self.document = document
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.prefix = ""  # the snapshot's text (the layout's prefix)
        self.held = ""  # the text the branch holds: prefix, turns, replies as the model wrote them
        self.stale = False  # the branch holds something the text does not show (a hidden special token)
        self.rounds: list[ToolRound] = []
        self.turn_rounds = 0  # rounds of the current turn

    # -- the conversation ------------------------------------------------------------------------
    def user(self, layout: ChatLayout, text: str) -> None:
        """The runner sent `text` as the next user turn (framed by `layout`, as Branch.send frames it)."""
        self.turn_rounds = 0
        if not self.held:
            self.prefix = layout.prefix
            content = f"{self.document}\n\n{text.strip()}" if self.document else text.strip()
            self.held = layout.prefix + layout.first_turn(text)
        else:
            content = text.strip()
            self.held += layout.next_turn(text)
        self.messages.append({"role": "user", "content": content})

    def params(self, base: SamplingParams) -> SamplingParams:
        """This round's sampling: a required or named call is constrained by the format's grammar."""
        choice = self.agent.tool_choice
        if choice == "auto" or (self.agent.reset_tool_choice and self.turn_rounds > 0):
            return base
        chosen = self.definitions if choice == "required" else [d for d in self.definitions
                                                                if d["function"]["name"] == choice]
        return base.with_overrides(grammar=self.fmt.grammar(chosen, self.agent.parallel_tool_calls and
                                                            choice == "required"))

    def calls(self, reply: Completion) -> tuple[str | None, list[ToolCall], list[str]] | None:
        """Read a reply: (its text outside calls, its calls, its unreadable call bodies), or None when it
        calls nothing (then it is the turn's answer). The branch's text grows by the reply either way."""
        self.held += self.engine.detokenize(reply.tokens)
        # NOTE: llama.cpp hides special tokens in text (but the format's markers, shown by the runner);
        # one in the reply is in the branch's KV but in no rendering of the text.
        self.stale = self.stale or any(self.engine.detokenize([t]) == "" for t in reply.tokens)
        content, calls = self.fmt.split(reply.text, None)
        bad = self.fmt.malformed(reply.text)
        if not calls and not bad:
            self.messages.append({"role": "assistant", "content": reply.text})
            return None
        return content, calls, bad

    def run(self, content: str | None, calls: Sequence[ToolCall], bad: Sequence[str]) -> list[ToolUse]:
        """Run the calls (in order) and add the assistant's calls and the tool results to the conversation."""
        uses = [run_call(self.tools, c) for c in calls]
        for i, body in enumerate(bad):
            uses.append(ToolUse(f"call_malformed_{len(self.rounds)}_{i}", "", body,
                                "Error: this tool call could not be read. Write each call as "
                                f'{self.fmt.open}{{"name": <tool name>, "arguments": {{...}}}}{self.fmt.close}'
                                " with a JSON object.", error="malformed"))
        self.messages.append({"role": "assistant", "content": content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
            for c in calls]})
        for use in uses:
            self.messages.append({"role": "tool", "tool_call_id": use.id, "name": use.name, "content": use.result})
        self.turn_rounds += 1
        return uses

    def follow_up(self) -> FollowUp:
        """The tokens that take the branch to the next assistant header, as the template renders it all."""
        full = self.engine.model.render_chat(self.messages, tools=self.definitions, add_generation_prompt=True)
        if not self.stale and full.startswith(self.held):
            text, refork = full[len(self.held):], False
        elif full.startswith(self.prefix):
            text, refork = full[len(self.prefix):], True
        else:
            raise KvforkError(f"agent {self.agent.name!r}: the chat template renders the conversation with another"
                              " beginning than its snapshot (it moves earlier text when tools are called); this"
                              " template cannot continue a branch")
        self.held, self.stale = full, False
        return FollowUp(text, self.engine.tokenize(text, special=True), refork)
