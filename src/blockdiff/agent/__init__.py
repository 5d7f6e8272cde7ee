"""The tool-using agent: an invented world and its questions (`world`), the shared toolbox
(`tools`), the trajectory format, parser, scripted solver and SFT data (`trajectory`), and the
loop that runs any policy — a scripted one or a model with any sampler — on a task (`loop`)."""

from .loop import AgentResult, ContextLimit, ModelPolicy, Reply, Step, replay_policy, run_agent
from .tasks import eval_tasks, is_held_out, make_task, train_tasks
from .tools import TOOLS, Toolbox, calculate
from .trajectory import Call, CallError, parse_call, render, scripted_trajectory, write_sft_data
from .world import Question, Task, World

__all__ = [
    "AgentResult",
    "Call",
    "CallError",
    "ContextLimit",
    "ModelPolicy",
    "Question",
    "Reply",
    "Step",
    "TOOLS",
    "Task",
    "Toolbox",
    "World",
    "calculate",
    "eval_tasks",
    "is_held_out",
    "make_task",
    "parse_call",
    "render",
    "replay_policy",
    "run_agent",
    "scripted_trajectory",
    "train_tasks",
    "write_sft_data",
]
