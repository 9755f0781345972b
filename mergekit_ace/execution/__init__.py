"""Memory planning and device policy for the rules (no merge math here; that lives in ``rules/``).

* :mod:`.memory`   -- per-weight peak-memory and flop estimates of every (strategy, row chunk);
* :mod:`.budget`   -- how much memory a device offers (``MERGEKIT_ACE_MEMORY_BUDGET``);
* :mod:`.cache`    -- keep every merged rule weight on disk (``MERGEKIT_ACE_CACHE_DIR``): resume a killed merge;
* :mod:`.executor` -- pick the cheapest plan that fits, run it, retry smaller on out-of-memory,
  then fall back to the CPU for that weight;
* :mod:`.plan_cli` -- ``mergekit-ace plan CONFIG``: the same estimates from safetensors headers;
* :mod:`.hub_headers` -- those headers for Hub ids, by range request (or from the local Hub cache);
* :mod:`.mergekit_yaml` -- run mergekit's ``mergekit-yaml`` in a subprocess (demo, sweep, ``mergekit-ace merge``).
"""

from mergekit_ace.execution.executor import WeightPlan, choose_plan, execute_rule

__all__ = ["WeightPlan", "choose_plan", "execute_rule"]
