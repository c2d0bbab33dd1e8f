"""The memeval leaderboard: a static site generated only from validated result sets (DESIGN §8).

``build_site(results_dirs, out)`` validates every result set (``summary.json`` + ``results.jsonl``) and
renders the site; invalid input raises ``memeval.errors.UsageError`` naming the file and the field, before
anything is written.
"""

from .build import build_site
from .validate import ResultSet, find_result_sets, load_result_set

__all__ = ["ResultSet", "build_site", "find_result_sets", "load_result_set"]
