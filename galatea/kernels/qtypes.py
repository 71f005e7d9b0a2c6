"""The GGUF types the native kernels hold as they are (ids are GGML's own)."""

from __future__ import annotations

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS = 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23

NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K",
         Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS"}
BLOCK = {t: 256 if t in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) else 32 for t in NAMES}  # inputs per block
BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34, Q2_K: 84, Q3_K: 110, Q4_K: 144, Q5_K: 176, Q6_K: 210,
         IQ4_NL: 18, IQ4_XS: 136}  # per block
FOUR_BIT = frozenset({Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, IQ4_NL, IQ4_XS})  # 4 bits or fewer
