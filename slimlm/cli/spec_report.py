"""The speculative acceptance rate of draft models against a target (CLI layer: it drives the engine).

``acceptance_rates(target, {"name": draft}, prompts, new_tokens)`` (target and drafts: ``LoadedModel``s,
or anything with ``.model`` and ``.tokenizer``) runs greedy speculative
decoding (fixed gamma = 4, no adaptation, so every draft is judged on the same proposals) of every
prompt through ``slimlm.engine``'s ``LLM`` and returns, per draft, the engine's counters:
``acceptance_rate`` = accepted / proposed draft tokens, ``tokens_per_step`` = tokens emitted per
verification step. Greedy output equals plain greedy decoding of the target whatever the draft, so only
the speed changes. Used by ``slimlm distill --acceptance-prompts``.
"""

from __future__ import annotations

from typing import Any


def sized_config(prompts: list[list[int]], new_tokens: int, extra: int = 0, block_size: int = 16) -> Any:
    """A scheduler config whose KV pool holds exactly these requests (the default 1 GiB pool takes
    seconds to zero on a loaded machine)."""
    from slimlm.engine.scheduler import SchedulerConfig

    blocks = sum(-(-(len(p) + new_tokens + extra + 1) // block_size) for p in prompts) + len(prompts) + 4
    return SchedulerConfig(num_blocks=blocks, block_size=block_size)


def acceptance_rates(target: Any, drafts: dict[str, Any], prompts: list[list[int]], new_tokens: int,
                     gamma: int = 4) -> dict[str, dict[str, Any]]:
    from slimlm.engine.llm import LLM
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.engine.spec import SpecConfig

    params = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    out: dict[str, dict[str, Any]] = {}
    for name, draft in drafts.items():
        draft.model.eval()
        llm = LLM(target, sized_config(prompts, new_tokens, gamma),
                  spec=SpecConfig(spec="draft", spec_adaptive=False, num_speculative_tokens=gamma), draft=draft)
        llm.generate(prompts, params)
        s = llm.engine.stats
        out[name] = {"acceptance_rate": float(s["spec_acceptance_rate"]), "proposed": int(s["spec_proposed"]),
                     "accepted": int(s["spec_accepted"]), "tokens_per_step": float(s["spec_tokens_per_step"])}
    return out


__all__ = ["acceptance_rates", "sized_config"]
