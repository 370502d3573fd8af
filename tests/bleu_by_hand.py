"""Corpus BLEU worked out from its definition, the reference the sacreBLEU
tests compare against (not a test module: imported by test_multi30k_*)."""

import collections
import math


def corpus_bleu(hyps, refs):
  """Corpus BLEU-4 (Papineni et al.) on whitespace tokens, no smoothing:
  100 * brevity penalty * geometric mean of the clipped n-gram precisions."""
  matches, totals = [0] * 4, [0] * 4
  hyp_len = ref_len = 0
  for h, r in zip(hyps, refs):
    h, r = h.split(), r.split()
    hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
    for n in range(1, 5):
      hc = collections.Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
      rc = collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
      matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
      totals[n - 1] += max(len(h) - n + 1, 0)
  log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
  bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
  return 100 * bp * math.exp(log_p)
