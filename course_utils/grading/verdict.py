"""Verdicts that a submission cannot reach: the grader's judge, the verdict process (plumbing;
not lesson 11's reward-model judge).

Grading runs in two processes that share nothing but plain data:

- the **student's kernel** (``course_utils.grading.sandbox``, with its limits) runs the student's cells, and
  nothing else: no test cell, no reference code, no seed for the hidden inputs. Then it only answers
  calls: "run your ``dpo_loss`` on these arguments" (``serve_call``).
- the **judge** (``python -m course_utils.grading.verdict``, started by the grader, never running student
  code) executes the solution notebook's own cells with every answer function replaced by a
  stand-in that forwards the call, through the grader, to the student's kernel. The test cells,
  their hidden inputs, the reference computations and the comparisons all run here, with the
  judge's own ``torch``, ``math``, builtins and check helpers. A question passes when its test cell
  runs without an exception *in the judge*.

What crosses between them is ``encode``/``decode``'s plain data: tensors (dtype, shape, bytes),
numbers, strings, booleans, ``None``, numpy arrays, transformers model configs (as their
settings), and lists, tuples and dicts of those. Anything
else a student function returns arrives as an ``Unsupported`` value, which fails any type check.
Objects the test cells pass in that are not plain data (a tokenizer, say) travel by name: the
judge sends "the global ``tokenizer``", and the student's kernel uses its own. Whatever the
submission does to its own process (patching ``torch.allclose``, the check helpers, builtins,
printing "passed", exiting) changes only the values it sends back.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import math
import os
import random
import signal
import sys
import traceback
import types

from course_utils.grading.checks import SEED_VARIABLE
from course_utils.grading.make_exercises import cell_text
from course_utils.grading.sandbox import stray_processes

MAX_VALUE_BYTES = 64 * 1024 * 1024  # a reply larger than this is refused (a wrong answer)
MAX_DEPTH = 32
REQUEST_FILE, REPLY_FILE = "call-request.json", "call-reply.json"


class Unsupported:
    """What a returned value of a type that cannot travel becomes: it passes no type check."""

    def __init__(self, type_name: str, reason: str = "a type the grader does not accept"):
        self.type_name, self.reason = type_name, reason

    def __repr__(self):
        return f"<{self.type_name}: {self.reason}>"


class StudentCodeError(Exception):
    """The student's function raised ``ename: evalue`` (an exception type the judge does not have)."""

    def __init__(self, ename: str, evalue: str):
        super().__init__(f"{ename}: {evalue}" if evalue else ename)
        self.ename, self.evalue = ename, evalue


class StudentTimeout(Exception):
    """The student's function ran past the time limit."""


class KernelDied(Exception):
    """The student's kernel stopped (it exited, was killed, or hit a limit)."""


# --- plain data in both directions -----------------------------------------------------------------

def encode(value, context_names: dict[int, str] | None = None, depth: int = 0, budget=None):
    """``value`` as JSON-able plain data. ``context_names`` maps ``id()`` of objects the receiver
    has under the same global name (the judge's context, e.g. a tokenizer) to that name."""
    import numpy as np
    import torch

    budget = budget if budget is not None else [MAX_VALUE_BYTES]
    if depth > MAX_DEPTH:
        return {"unsupported": "nesting", "reason": f"nested deeper than {MAX_DEPTH}"}
    if value is None or isinstance(value, bool):
        return {"bool": value} if isinstance(value, bool) else {"none": None}
    if isinstance(value, int):
        return {"int": str(int.__index__(value))}
    if isinstance(value, float):
        number = float.__float__(value)
        return {"float": repr(number) if math.isfinite(number) else str(number)}
    if isinstance(value, str):
        text = str.__str__(value)
        budget[0] -= len(text)
        if budget[0] < 0:
            return {"unsupported": "str", "reason": "larger than the grader accepts"}
        return {"str": text}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"size": [int(n) for n in value]}
    if isinstance(value, torch.Tensor):
        tensor = torch.Tensor.detach(value).cpu().contiguous()
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.dtype.is_complex:
            return {"unsupported": "Tensor", "reason": "a tensor layout or dtype the grader does not accept"}
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        budget[0] -= len(raw)
        if budget[0] < 0:
            return {"unsupported": "Tensor", "reason": "larger than the grader accepts"}
        return {"tensor": base64.b64encode(raw).decode(), "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape)}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        array = np.ascontiguousarray(value)
        budget[0] -= array.nbytes
        if budget[0] < 0:
            return {"unsupported": "ndarray", "reason": "larger than the grader accepts"}
        return {"ndarray": base64.b64encode(array.tobytes()).decode(), "dtype": array.dtype.str,
                "shape": list(array.shape)}
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"npscalar": repr(value.item()), "dtype": value.dtype.str}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        items = tuple.__iter__(value) if kind == "tuple" else list.__iter__(value)
        return {kind: [encode(item, context_names, depth + 1, budget) for item in items]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, context_names, depth + 1, budget),
                          encode(v, context_names, depth + 1, budget)] for k, v in dict.items(value)]}
    if type(value).__module__.startswith("transformers") and hasattr(value, "to_dict"):
        from transformers import PretrainedConfig

        if isinstance(value, PretrainedConfig):  # a model config travels as its settings
            return {"config": type(value).__name__,
                    "values": encode(value.to_dict(), None, depth + 1, budget)}
    if isinstance(value, types.FunctionType) and context_names is not None:
        return _encode_function(value, context_names, depth, budget)
    if isinstance(value, types.ModuleType) and context_names is not None:
        return {"module": value.__name__}
    if context_names and id(value) in context_names:  # not plain data: the receiver's own copy
        return {"global": context_names[id(value)]}
    return {"unsupported": type(value).__name__, "reason": "a type the grader does not accept"}


def _encode_function(function, context_names, depth, budget):
    """A test's own function passed to a student's (a judge for ``swapped_win_rate``): its
    compiled code, defaults, closure and the globals it reads, so the student's kernel can call
    it. Only the judge sends these, and only the student's kernel accepts them."""
    import marshal

    code = function.__code__
    referenced = {name: function.__globals__[name] for name in code.co_names
                  if name in function.__globals__}
    return {"function": base64.b64encode(marshal.dumps(code)).decode(), "name": function.__name__,
            "defaults": [encode(v, context_names, depth + 1, budget) for v in function.__defaults__ or ()],
            "closure": [encode(cell.cell_contents, context_names, depth + 1, budget)
                        for cell in function.__closure__ or ()],
            "globals": {name: encode(v, context_names, depth + 1, budget) for name, v in referenced.items()}}


def _decode_function(data, namespace):
    import marshal

    function_globals = {"__builtins__": builtins}
    function_globals.update({name: decode(v, namespace, True) for name, v in data["globals"].items()})
    closure = tuple(types.CellType(decode(v, namespace, True)) for v in data["closure"]) or None
    defaults = tuple(decode(v, namespace, True) for v in data["defaults"]) or None
    return types.FunctionType(marshal.loads(base64.b64decode(data["function"])), function_globals,
                              data["name"], defaults, closure)


def decode(data, namespace: dict | None = None, trusted: bool = False):
    """The value ``encode`` described; ``{"global": name}`` is looked up in ``namespace``. Only a
    ``trusted`` sender (the judge, to the student's kernel) may send functions and modules."""
    import numpy as np
    import torch

    (kind, payload), *_ = data.items()
    if kind == "none":
        return None
    if kind == "bool":
        return bool(payload)
    if kind == "int":
        return int(payload)
    if kind == "float":
        return float(payload)
    if kind == "str":
        return str(payload)
    if kind == "dtype":
        return getattr(torch, payload)
    if kind == "size":
        return torch.Size(payload)
    if kind == "tensor":
        dtype = getattr(torch, data["dtype"])
        raw = bytearray(base64.b64decode(payload))
        if not raw:
            return torch.empty(data["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(data["shape"]).clone()
    if kind == "ndarray":
        array = np.frombuffer(base64.b64decode(payload), dtype=np.dtype(data["dtype"]))
        return array.reshape(data["shape"]).copy()
    if kind == "npscalar":
        return np.dtype(data["dtype"]).type(json.loads(payload) if payload not in ("nan", "inf", "-inf")
                                            else float(payload))
    if kind in ("list", "tuple"):
        items = [decode(item, namespace, trusted) for item in payload]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {decode(k, namespace, trusted): decode(v, namespace, trusted) for k, v in payload}
    if kind in ("function", "module"):
        if not trusted:
            return Unsupported(kind, "code is not an answer")
        if kind == "module":
            import importlib

            return importlib.import_module(payload)
        return _decode_function(data, namespace)
    if kind == "config":
        import transformers

        config_class = getattr(transformers, payload, None)
        if not (isinstance(config_class, type) and issubclass(config_class, transformers.PretrainedConfig)):
            return Unsupported(payload, "not a transformers config")
        return config_class.from_dict(decode(data["values"]))
    if kind == "global":
        if namespace is None or payload not in namespace:
            raise NameError(f"name {payload!r} is not defined")
        return namespace[payload]
    if kind == "unsupported":
        return Unsupported(payload, data.get("reason", ""))
    raise ValueError(f"unknown kind {kind!r}")


# --- the student's side: answer one call -----------------------------------------------------------

def serve_call(name: str) -> None:
    """Run in the student's kernel by the grader: call the student's ``name`` on the arguments in
    ``call-request.json`` and write what it returned (or raised) to ``call-reply.json``."""
    from IPython import get_ipython

    namespace = get_ipython().user_ns
    request = json.loads(open(REQUEST_FILE).read())
    try:
        function = namespace[name]
    except KeyError:
        reply = {"status": "raised", "ename": "NameError", "evalue": f"name {name!r} is not defined"}
    else:
        try:
            args = [decode(a, namespace, trusted=True) for a in request["args"]]
            kwargs = {k: decode(v, namespace, trusted=True) for k, v in request["kwargs"].items()}
            result = function(*args, **kwargs)
            reply = {"status": "ok", "value": encode(result)}
        except BaseException as error:  # noqa: BLE001 (whatever the student's code raises is its answer)
            reply = {"status": "raised", "ename": type(error).__name__, "evalue": str(error)[:500]}
    _end_stray_children()
    with open(REPLY_FILE, "w") as file:
        json.dump(reply, file)


def _end_stray_children() -> None:
    """Kill and reap what the call forked and left running: their slots count against the process
    limit until reaped, and the kernel needs some for its own threads."""
    if not sys.platform.startswith("linux"):
        return

    for pid in stray_processes(os.getpgrp()):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # reaped: a zombie would still hold its slot
        except (OSError, ChildProcessError):
            pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --- the judge's side ------------------------------------------------------------------------------

def answer_names(solution: dict) -> list[str]:
    """The functions the solution's answer cells define (the cells with ``### BEGIN SOLUTION`` that
    are not graded test cells): what the student writes and the tests call."""
    import ast

    names = []
    for cell in solution["cells"]:
        meta = cell.get("metadata", {}).get("course", {})
        source = cell_text(cell)
        if cell["cell_type"] == "code" and "grade_id" not in meta and "### BEGIN SOLUTION" in source:
            names += [node.name for node in ast.parse(source).body
                      if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    return names


def question_seed(seed: int, grade_id: str) -> int:
    import hashlib

    return int(hashlib.sha256(f"{seed}:{grade_id}".encode()).hexdigest()[:8], 16)


def seed_everything(value: int) -> None:
    import numpy as np
    import torch

    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def _raise_student_error(reply: dict):
    ename, evalue = reply.get("ename", "Error"), reply.get("evalue", "")
    if ename == "NotImplementedError":
        raise NotImplementedError(evalue)
    if ename == "Timeout":
        raise StudentTimeout(evalue)
    if ename == "KernelDied":
        raise KernelDied(evalue)
    raise StudentCodeError(ename, evalue)


class _Channel:
    """The judge's line-based link to the grader: one JSON object per line each way."""

    def __init__(self, inbound, outbound):
        self.inbound, self.outbound = inbound, outbound

    def send(self, message: dict) -> None:
        self.outbound.write(json.dumps(message) + "\n")
        self.outbound.flush()

    def receive(self) -> dict:
        line = self.inbound.readline()
        if not line:
            raise KernelDied("the grader closed the connection")
        return json.loads(line)


def judge(solution_path: str, channel: _Channel, timeout_s: float) -> dict[str, list[str]]:
    """Run the solution's cells with forwarding stand-ins for its answer functions; return
    ``{grade_id: [status, message]}`` for every graded cell."""

    solution = json.loads(open(solution_path, encoding="utf-8").read())
    names = answer_names(solution)
    seed = int(os.environ.get("COURSE_GRADER_SEED", "0"))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    context_ids: dict[int, str] = {}

    calls = [0]

    def stand_in(name):
        def forward(*args, **kwargs):
            calls[0] += 1
            message = {"call": name, "id": calls[0], "args": [encode(a, context_ids) for a in args],
                       "kwargs": {k: encode(v, context_ids) for k, v in kwargs.items()}}
            remaining = signal.alarm(0)  # the student's time is the grader's to limit, not ours
            try:
                channel.send(message)
                reply = channel.receive()
                while reply.get("id") != calls[0]:  # a late reply to an earlier call: not this one
                    reply = channel.receive()
            finally:
                if remaining:
                    signal.alarm(remaining)
            if reply["status"] == "ok":
                return decode(reply["value"])
            _raise_student_error(reply)
        forward.__name__ = forward.__qualname__ = name
        return forward

    def on_alarm(*_):
        raise TimeoutError(f"the test cell ran past {timeout_s:g} s in the judge")

    signal.signal(signal.SIGALRM, on_alarm)
    verdicts = {}
    for cell in solution["cells"]:
        if cell["cell_type"] != "code":
            continue
        meta = cell.get("metadata", {}).get("course", {})
        source = cell_text(cell)
        if "grade_id" not in meta and "### BEGIN SOLUTION" in source:
            for name in names:
                namespace[name] = stand_in(name)
            continue
        if "grade_id" not in meta:  # context: imports, data, helpers, as the student's notebook has
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                exec(compile(source, "<context cell>", "exec"), namespace)  # noqa: S102
            context_ids.update({id(v): k for k, v in namespace.items() if not k.startswith("_")
                                and k not in names and not isinstance(v, (int, float, str, bool))})
            continue
        seed_everything(question_seed(seed, meta["grade_id"]))
        signal.alarm(max(1, int(timeout_s)))
        try:
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                exec(compile(source, f"<test {meta['grade_id']}>", "exec"), namespace)  # noqa: S102
            verdicts[meta["grade_id"]] = ["passed", ""]
        except AssertionError as error:
            verdicts[meta["grade_id"]] = ["failed", f"AssertionError: {error}"]
        except NotImplementedError as error:
            verdicts[meta["grade_id"]] = ["error", f"not answered yet (NotImplementedError: {error})"]
        except StudentTimeout as error:
            verdicts[meta["grade_id"]] = ["timeout", f"timed out: {error}"]
        except KernelDied as error:
            verdicts[meta["grade_id"]] = ["error", f"the kernel died ({error})"]
        except StudentCodeError as error:
            verdicts[meta["grade_id"]] = ["error", str(error)]
        except Exception as error:  # noqa: BLE001 (a wrong value can break a reference computation)
            verdicts[meta["grade_id"]] = ["error", f"{type(error).__name__}: {error}"]
        finally:
            signal.alarm(0)
    return verdicts


def main(argv=None) -> int:
    """``python -m course_utils.grading.verdict TIMEOUT``: read ``{"grade": SOLUTION, "seed": N}`` lines
    from stdin, speak the call protocol for each and answer ``{"verdicts": ...}``, until stdin
    closes. Everything the cells print goes nowhere."""

    timeout_s = float((argv or sys.argv[1:])[0])
    channel = _Channel(sys.stdin, sys.stdout)
    sys.stdout = open(os.devnull, "w")  # the protocol owns the real stdout
    while True:
        line = channel.inbound.readline()
        if not line:
            return 0
        request = json.loads(line)
        if "grade" not in request:
            continue  # a late reply to a call of the previous submission
        os.environ[SEED_VARIABLE] = str(request["seed"])
        try:
            verdicts = judge(request["grade"], channel, timeout_s)
        except KernelDied:
            return 1  # the grader is gone
        except Exception:  # noqa: BLE001 (a problem in the solution notebook is the grader's)
            channel.send({"grader_error": traceback.format_exc(limit=3)})
            return 1
        channel.send({"verdicts": verdicts})


if __name__ == "__main__":
    sys.exit(main())
