// Fused prefix attention on the CPU (see prefix_attention_cpu.h).
//
// Work decomposition
//   forward : one task per (row b, kv head, block of queries); the block holds
//             the queries of all q heads in the kv head's group, stacked as
//             rows r = g * nq + t, so K/V chunks are loaded once per group.
//             Key chunks may run along [prefix slots; sequence keys] (score_chunk).
//             With a sliding window a block's spans start at the first key its
//             first query can see, so the work grows like Lq * window, not Lq * Lk.
//   backward: one task per (row b, kv head); it owns dq for the group's heads
//             and dk/dv of its row, so nothing is shared between tasks. The
//             prefix gradient of each task goes to a per-row partial and is
//             then summed per prompt in row order (deterministic). Without
//             seq_grads only the prefix keys are visited (dq, dk, dv skipped).
// Block products go through blas.h; the softmax rows through row_math.h.
#include "prefix_attention_cpu.h"

#include "float_types.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <utility>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "row_math.h"

namespace softprompt::cpu {
namespace {

constexpr int64_t kKeyBlock = 128;   // keys per chunk (a multiple of kLanes)
constexpr int64_t kTargetRows = 64;           // stacked (head, query) rows per forward block
constexpr int64_t kTargetRowsBackward = 64;   // and per backward block

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

int64_t queries_per_block(const PrefixAttentionParams& p, int64_t target_rows = kTargetRows) {
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t bq = std::max<int64_t>(1, target_rows / group);
  return std::min<int64_t>(bq, std::max<int64_t>(p.len_q, 1));
}

// Keys one row attends to: a range of its prompt's prefix slots, or of its own sequence keys.
template <typename scalar_t>
struct KeySpan {
  const scalar_t* k;  // [count, D], row stride k_ld (row 0 = key `first`)
  const scalar_t* v;  // [count, D], row stride v_ld
  int64_t k_ld, v_ld, count;
  bool is_prefix;
  int64_t first;  // key of row 0: a prefix slot, or a sequence key j
  int64_t pos0;   // its index for the sliding window (slot s of an n-slot prompt: s - n; key j: j)
};

// The spans of a block of queries starting at query i_first: the prefix slots and sequence keys
// [first, key_end) that some query of the block may see (the window cuts off what lies before
// the first query's reach; causality what lies after the last one's).
template <typename scalar_t>
int make_spans(const PrefixAttentionParams& p, int64_t b, int64_t hkv, int64_t i_first, int64_t key_end,
               KeySpan<scalar_t> spans[2]) {
  int n = 0;
  const int64_t lo = p.window_first_index(i_first);
  const int64_t pid = p.prompt_of_row(b);
  if (pid >= 0 && p.prefix_len(pid) > 0) {
    const int64_t len = p.prefix_len(pid), first = std::max<int64_t>(0, lo - p.prefix_index(b, 0, len));
    if (first < len)
      spans[n++] = {static_cast<const scalar_t*>(p.prefix_k) + pid * p.pk_strides.b + hkv * p.pk_strides.h +
                        first * p.pk_strides.l,
                    static_cast<const scalar_t*>(p.prefix_v) + pid * p.pv_strides.b + hkv * p.pv_strides.h +
                        first * p.pv_strides.l,
                    p.pk_strides.l, p.pv_strides.l, len - first, true, first, p.prefix_index(b, first, len)};
  }
  const int64_t first = std::max<int64_t>(0, lo);
  if (key_end > first) {
    spans[n++] = {static_cast<const scalar_t*>(p.k) + b * p.k_strides.b + hkv * p.k_strides.h + first * p.k_strides.l,
                  static_cast<const scalar_t*>(p.v) + b * p.v_strides.b + hkv * p.v_strides.h + first * p.v_strides.l,
                  p.k_strides.l, p.v_strides.l, key_end - first, false, first, first};
  }
  return n;
}

// Rows [0, rows) of a [*, D] matrix as acc_t: the source itself when the types
// match (no copy), else converted into `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* buf,
                         int64_t* out_ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *out_ld = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) buf[r * D + d] = static_cast<acc_t>(src[r * ld + d]);
    *out_ld = D;
    return buf;
  }
}

// Stacked query-block rows: dst[g * nq + t] = factor * src[b, hkv * G + g, i0 + t].
template <typename scalar_t, typename acc_t>
void load_block_rows(const scalar_t* base, const Strides4& st, const PrefixAttentionParams& p,
                     int64_t b, int64_t hkv, int64_t i0, int64_t nq, acc_t factor, acc_t* dst) {
  const int64_t group = p.heads_q / p.heads_kv, D = p.head_dim;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t t = 0; t < nq; ++t) {
      const scalar_t* src = base + b * st.b + (hkv * group + g) * st.h + (i0 + t) * st.l;
      acc_t* row = dst + (g * nq + t) * D;
      for (int64_t d = 0; d < D; ++d) row[d] = factor * static_cast<acc_t>(src[d]);
    }
}

// Masks the scores s [M, n] (row stride lds) of rows [c, c + n) of a span: sequence keys by padding
// and causality, every key by the sliding window.
template <typename acc_t, typename Span>
void mask_scores(const PrefixAttentionParams& p, int64_t b, int64_t i0, int64_t nq, const Span& span, int64_t c,
                 int64_t n, int64_t lds, acc_t* s) {
  const int64_t group = p.heads_q / p.heads_kv, rows = group * nq;
  if (p.window > 0) {
    const int64_t pos = span.pos0 + c;  // window index of column 0
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t hidden = std::clamp<int64_t>(p.window_first_index(i0 + t) - pos, 0, n);
      for (int64_t g = 0; g < group && hidden > 0; ++g)
        std::fill(s + (g * nq + t) * lds, s + (g * nq + t) * lds + hidden, neg_inf<acc_t>());
    }
  }
  if (span.is_prefix) return;  // the prefix is never causally masked and has no padding
  const int64_t j0 = span.first + c;
  if (p.key_padding_mask) {
    for (int64_t c = 0; c < n; ++c) {
      if (p.key_is_real(b, j0 + c)) continue;
      for (int64_t r = 0; r < rows; ++r) s[r * lds + c] = neg_inf<acc_t>();
    }
  }
  if (p.causal && j0 + n > p.causal_key_end(i0)) {
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t first_hidden = std::max(p.causal_key_end(i0 + t), j0) - j0;
      if (first_hidden >= n) continue;
      for (int64_t g = 0; g < group; ++g)
        std::fill(s + (g * nq + t) * lds + first_hidden, s + (g * nq + t) * lds + n, neg_inf<acc_t>());
    }
  }
}

// Block products of the kernel. With few stacked query rows (decoding: one query per q head) a BLAS
// call costs more than the work, so those go through the vectorised row helpers instead.
constexpr int64_t kSmallRows = 8;

// s [m, n] = a [m, k] @ b[n, k]^T
template <typename acc_t>
void scores_product(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                    acc_t* s, int64_t lds) {
  if (m > kSmallRows) {
    gemm<acc_t>(false, true, m, n, k, 1, a, lda, b, ldb, 0, s, lds);
    return;
  }
  scores_small(m, n, k, a, lda, b, ldb, s, lds);
}

// c [m, k] += p [m, n] @ b [n, k]
template <typename acc_t>
void accumulate_product(int64_t m, int64_t k, int64_t n, const acc_t* p, int64_t ldp, const acc_t* b,
                        int64_t ldb, acc_t* c, int64_t ldc) {
  if (m > kSmallRows) {
    gemm<acc_t>(false, false, m, k, n, 1, p, ldp, b, ldb, 1, c, ldc);
    return;
  }
  accumulate_small(m, k, n, p, ldp, b, ldb, c, ldc);
}

template <typename acc_t>
struct Workspace {
  std::vector<acc_t> q, o, s, dp, dout, dq, kbuf, vbuf, m, l, lse, delta, dk, dv;
  std::vector<acc_t> cap_grad;  // backward with softcap: d capped / d raw score = 1 - tanh^2 per score
  Workspace(int64_t rows, int64_t D, bool backward, int64_t len_k, bool softcap = false) {
    q.resize(rows * D);
    s.resize(rows * kKeyBlock);
    kbuf.resize(kKeyBlock * D);
    vbuf.resize(kKeyBlock * D);
    if (!backward) {
      o.resize(rows * D);
      m.resize(rows);
      l.resize(rows);
    } else {
      dp.resize(rows * kKeyBlock);
      dout.resize(rows * D);
      dq.resize(rows * D);
      lse.resize(rows);
      delta.resize(rows);
      dk.resize(len_k * D);
      dv.resize(len_k * D);
      if (softcap) cap_grad.resize(rows * kKeyBlock);
    }
  }
};

// s <- cap * tanh(s / cap) on [rows, n] (row stride width); with `grad`, also d s_capped / d s = 1 - t^2.
template <typename acc_t>
void soft_cap(acc_t* s, int64_t rows, int64_t n, int64_t width, acc_t cap, acc_t* grad) {
  const acc_t inv = acc_t(1) / cap;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const acc_t t = std::tanh(s[r * width + c] * inv);
      s[r * width + c] = cap * t;
      if (grad) grad[r * width + c] = acc_t(1) - t * t;
    }
}

// With attention sinks, one more logit per head joins the normaliser of a row whose running max is m
// and sum l: returns the new (m, l).
template <typename acc_t>
std::pair<acc_t, acc_t> add_sink(acc_t m, acc_t l, acc_t sink) {
  const acc_t m_new = std::max(m, sink);
  return {m_new, l * std::exp(m - m_new) + std::exp(sink - m_new)};
}

// n keys as acc_t rows (K and V, row strides k_ld / v_ld), their scaled and masked scores
// written to ws.s [rows, n] (s = q_block @ K^T) with row stride `width`: n rounded up to whole
// vectors (kLanes), the extra columns -inf, so that the softmax passes run on whole vectors only
// (a scalar tail of exponentials per row cost as much as the vector part at n = 100).
template <typename acc_t>
struct KeyChunk {
  const acc_t* k;
  const acc_t* v;
  int64_t k_ld, v_ld, n, width;
};

// Chunk [c0, c0 + n) of the keys of `spans` taken as one axis (prefix slots, then sequence keys).
// A chunk inside one span is read in place; one that straddles both is gathered into one buffer,
// so a short prefix (k = 16 before 32 prompt tokens when serving) costs no block products of its
// own. The forward gathers only where that saves a chunk and the products go to BLAS (more than
// kSmallRows rows); otherwise, and in the backward (whose key gradients go to different places per
// span), each span is passed alone.
template <typename scalar_t>
KeyChunk<acc_type_t<scalar_t>> score_chunk(const PrefixAttentionParams& p, const KeySpan<scalar_t>* spans,
                                           int n_spans, int64_t c0, int64_t total, int64_t b, int64_t i0,
                                           int64_t nq, Workspace<acc_type_t<scalar_t>>& ws) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t D = p.head_dim, rows = (p.heads_q / p.heads_kv) * nq;
  struct Part {
    const KeySpan<scalar_t>* span;
    int64_t first, count, column;  // keys [first, first + count) of the span at chunk column `column`
  };
  Part parts[2];
  int n_parts = 0;
  KeyChunk<acc_t> c;
  c.n = std::min(kKeyBlock, total - c0);
  c.width = (c.n + kLanes - 1) / kLanes * kLanes;
  for (int64_t si = 0, start = 0; si < n_spans; start += spans[si].count, ++si) {
    const int64_t lo = std::max(c0, start), hi = std::min(c0 + c.n, start + spans[si].count);
    if (lo < hi) parts[n_parts++] = {&spans[si], lo - start, hi - lo, lo - c0};
  }
  if (n_parts == 1) {
    const KeySpan<scalar_t>& span = *parts[0].span;
    c.k = rows_as_acc(span.k + parts[0].first * span.k_ld, span.k_ld, c.n, D, ws.kbuf.data(), &c.k_ld);
    c.v = rows_as_acc(span.v + parts[0].first * span.v_ld, span.v_ld, c.n, D, ws.vbuf.data(), &c.v_ld);
  } else {
    for (int i = 0; i < n_parts; ++i) {
      const Part& part = parts[i];
      const KeySpan<scalar_t>& span = *part.span;
      for (int64_t r = 0; r < part.count; ++r) {
        const scalar_t* k_row = span.k + (part.first + r) * span.k_ld;
        const scalar_t* v_row = span.v + (part.first + r) * span.v_ld;
        acc_t* k_dst = ws.kbuf.data() + (part.column + r) * D;
        acc_t* v_dst = ws.vbuf.data() + (part.column + r) * D;
        for (int64_t d = 0; d < D; ++d) {
          k_dst[d] = static_cast<acc_t>(k_row[d]);
          v_dst[d] = static_cast<acc_t>(v_row[d]);
        }
      }
    }
    c.k = ws.kbuf.data();
    c.v = ws.vbuf.data();
    c.k_ld = c.v_ld = D;
  }
  acc_t* s = ws.s.data();
  scores_product<acc_t>(rows, c.n, D, ws.q.data(), D, c.k, c.k_ld, s, c.width);
  if (p.softcap > 0)
    soft_cap(s, rows, c.n, c.width, static_cast<acc_t>(p.softcap), ws.cap_grad.empty() ? nullptr : ws.cap_grad.data());
  if (c.width > c.n)
    for (int64_t r = 0; r < rows; ++r) std::fill(s + r * c.width + c.n, s + (r + 1) * c.width, neg_inf<acc_t>());
  for (int i = 0; i < n_parts; ++i)
    mask_scores(p, b, i0, nq, *parts[i].span, parts[i].first, parts[i].count, c.width, s + parts[i].column);
  return c;
}

// ---------------------------------------------------------------- forward

template <typename scalar_t>
void forward_block(const PrefixAttentionParams& p, int64_t b, int64_t hkv, int64_t i0, int64_t nq,
                   Workspace<acc_type_t<scalar_t>>& ws) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t group = p.heads_q / p.heads_kv, D = p.head_dim, rows = group * nq;
  load_block_rows(static_cast<const scalar_t*>(p.q), p.q_strides, p, b, hkv, i0, nq,
                  static_cast<acc_t>(p.scale), ws.q.data());
  std::fill(ws.o.begin(), ws.o.begin() + rows * D, acc_t(0));
  std::fill(ws.m.begin(), ws.m.begin() + rows, neg_inf<acc_t>());
  std::fill(ws.l.begin(), ws.l.begin() + rows, acc_t(0));

  KeySpan<scalar_t> spans[2];
  const int n_spans = make_spans(p, b, hkv, i0, p.causal_key_end(i0 + nq - 1), spans);
  auto process = [&](const KeyChunk<acc_t>& c) {
    acc_t* s = ws.s.data();
    online_softmax_chunk(s, rows, c.width, ws.m.data(), ws.l.data(), ws.o.data(), D);
    accumulate_product<acc_t>(rows, D, c.n, s, c.width, c.v, c.v_ld, ws.o.data(), D);
  };
  int64_t total = 0, span_chunks = 0;
  for (int si = 0; si < n_spans; ++si) {
    total += spans[si].count;
    span_chunks += (spans[si].count + kKeyBlock - 1) / kKeyBlock;
  }
  // Gather across the spans only where it saves a chunk (its BLAS calls and softmax pass) and the
  // products go to BLAS at all; otherwise every chunk is read in place.
  if (rows > kSmallRows && (total + kKeyBlock - 1) / kKeyBlock < span_chunks) {
    for (int64_t c0 = 0; c0 < total; c0 += kKeyBlock)
      process(score_chunk(p, spans, n_spans, c0, total, b, i0, nq, ws));
  } else {
    for (int si = 0; si < n_spans; ++si)
      for (int64_t j0 = 0; j0 < spans[si].count; j0 += kKeyBlock)
        process(score_chunk(p, &spans[si], 1, j0, spans[si].count, b, i0, nq, ws));
  }

  auto* out = static_cast<scalar_t*>(p.out);
  auto* lse = static_cast<acc_t*>(p.lse);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hkv * group + g;
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t r = g * nq + t, i = i0 + t;
      scalar_t* dst = out + b * p.out_strides.b + h * p.out_strides.h + i * p.out_strides.l;
      const acc_t* src = ws.o.data() + r * D;
      acc_t m = ws.m[r], l = ws.l[r], rescale = acc_t(1);  // o is relative to m
      if (p.sinks) {
        const auto [m_new, l_new] = add_sink(m, l, static_cast<const acc_t*>(p.sinks)[h]);
        rescale = l > acc_t(0) ? std::exp(m - m_new) : acc_t(0);
        m = m_new, l = l_new;
      }
      const bool seen = l > acc_t(0);
      const acc_t inv = seen ? rescale / l : acc_t(0);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d] * inv);
      lse[(b * p.heads_q + h) * p.len_q + i] = seen ? m + std::log(l) : neg_inf<acc_t>();
    }
  }
}

// ---------------------------------------------------------------- backward

template <typename scalar_t>
void backward_row_head(const PrefixAttentionGradParams& p, int64_t b, int64_t hkv,
                       acc_type_t<scalar_t>* prefix_dk, acc_type_t<scalar_t>* prefix_dv,
                       Workspace<acc_type_t<scalar_t>>& ws) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t group = p.heads_q / p.heads_kv, D = p.head_dim, Lk = p.len_k;
  const int64_t bq = queries_per_block(p, kTargetRowsBackward);
  const bool seq_grads = p.seq_grads, prefix_grads = prefix_dk != nullptr;
  if (seq_grads) {
    std::fill(ws.dk.begin(), ws.dk.end(), acc_t(0));
    std::fill(ws.dv.begin(), ws.dv.end(), acc_t(0));
  }

  for (int64_t i0 = 0; i0 < p.len_q; i0 += bq) {
    const int64_t nq = std::min(bq, p.len_q - i0), rows = group * nq;
    load_block_rows(static_cast<const scalar_t*>(p.q), p.q_strides, p, b, hkv, i0, nq,
                    static_cast<acc_t>(p.scale), ws.q.data());
    load_block_rows(static_cast<const scalar_t*>(p.grad_out), p.grad_out_strides, p, b, hkv, i0, nq,
                    acc_t(1), ws.dout.data());
    // delta = rowsum(dO * O) - dlse; ws.dq holds O until it is zeroed below.
    load_block_rows(static_cast<const scalar_t*>(p.out), p.out_strides, p, b, hkv, i0, nq, acc_t(1),
                    ws.dq.data());
    const auto* lse = static_cast<const acc_t*>(p.lse);
    const auto* grad_lse = static_cast<const acc_t*>(p.grad_lse);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t t = 0; t < nq; ++t) {
        const int64_t r = g * nq + t, idx = (b * p.heads_q + hkv * group + g) * p.len_q + i0 + t;
        ws.lse[r] = lse[idx];
        ws.delta[r] = dot(ws.dout.data() + r * D, ws.dq.data() + r * D, D) -
                      (grad_lse ? grad_lse[idx] : acc_t(0));
      }
    std::fill(ws.dq.begin(), ws.dq.begin() + rows * D, acc_t(0));

    KeySpan<scalar_t> spans[2];
    const int n_spans = make_spans(p, b, hkv, i0, p.causal_key_end(i0 + nq - 1), spans);
    for (int si = 0; si < n_spans; ++si) {
      const KeySpan<scalar_t>& span = spans[si];
      // The sequence keys feed only dq, dk and dv; the prefix feeds dq and the prefix gradients.
      const bool want_kv = span.is_prefix ? prefix_grads : seq_grads;
      if (!want_kv && !seq_grads) continue;
      acc_t* dk_span = (span.is_prefix ? prefix_dk : ws.dk.data()) + span.first * D;
      acc_t* dv_span = (span.is_prefix ? prefix_dv : ws.dv.data()) + span.first * D;
      for (int64_t j0 = 0; j0 < span.count; j0 += kKeyBlock) {
        const KeyChunk<acc_t> c = score_chunk(p, &span, 1, j0, span.count, b, i0, nq, ws);
        const int64_t n = c.n, width = c.width;
        acc_t* s = ws.s.data();
        acc_t* dp = ws.dp.data();
        scores_product<acc_t>(rows, n, D, ws.dout.data(), D, c.v, c.v_ld, dp, width);
        // Padding columns (P = exp(-inf) = 0) are never read by the products below.
        softmax_grad_chunk(s, dp, rows, width, ws.lse.data(), ws.delta.data());
        // s holds P and dp holds dS (gradient of the scaled, capped scores); through the cap:
        if (p.softcap > 0)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t col = 0; col < n; ++col) dp[r * width + col] *= ws.cap_grad[r * width + col];
        if (want_kv) {
          gemm<acc_t>(true, false, n, D, rows, 1, s, width, ws.dout.data(), D, 1, dv_span + j0 * D, D);
          gemm<acc_t>(true, false, n, D, rows, 1, dp, width, ws.q.data(), D, 1, dk_span + j0 * D, D);
        }
        if (seq_grads) accumulate_product<acc_t>(rows, D, n, dp, width, c.k, c.k_ld, ws.dq.data(), D);
      }
    }

    if (!seq_grads) continue;
    auto* grad_q = static_cast<scalar_t*>(p.grad_q);
    const acc_t scale = static_cast<acc_t>(p.scale);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t t = 0; t < nq; ++t) {
        scalar_t* dst = grad_q + b * p.grad_q_strides.b + (hkv * group + g) * p.grad_q_strides.h +
                        (i0 + t) * p.grad_q_strides.l;
        const acc_t* src = ws.dq.data() + (g * nq + t) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d] * scale);
      }
  }

  if (!seq_grads) return;
  auto* grad_k = static_cast<scalar_t*>(p.grad_k);
  auto* grad_v = static_cast<scalar_t*>(p.grad_v);
  for (int64_t j = 0; j < Lk; ++j) {
    scalar_t* dk_dst = grad_k + b * p.grad_k_strides.b + hkv * p.grad_k_strides.h + j * p.grad_k_strides.l;
    scalar_t* dv_dst = grad_v + b * p.grad_v_strides.b + hkv * p.grad_v_strides.h + j * p.grad_v_strides.l;
    for (int64_t d = 0; d < D; ++d) {
      dk_dst[d] = static_cast<scalar_t>(ws.dk[j * D + d]);
      dv_dst[d] = static_cast<scalar_t>(ws.dv[j * D + d]);
    }
  }
}

// grad_prefix[p, hkv] = sum over rows b with prompt p of partial[b, hkv] (row order).
template <typename scalar_t>
void reduce_prefix_grads(const PrefixAttentionGradParams& p, const acc_type_t<scalar_t>* partial,
                         const Strides4& dst_st, void* dst_ptr) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t K = p.prefix_slots, D = p.head_dim, Hkv = p.heads_kv;
  std::vector<std::vector<int64_t>> rows_of_prompt(p.num_prompts);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t pid = p.prompt_of_row(b);
    if (pid >= 0) rows_of_prompt[pid].push_back(b);
  }
  auto* dst = static_cast<scalar_t*>(dst_ptr);
  at::parallel_for(0, p.num_prompts * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pid = item / Hkv, hkv = item % Hkv, len = p.prefix_len(pid);
      for (int64_t slot = 0; slot < K; ++slot) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        if (slot < len)
          for (int64_t b : rows_of_prompt[pid]) {
            const acc_t* src = partial + ((b * Hkv + hkv) * K + slot) * D;
            for (int64_t d = 0; d < D; ++d) sum[d] += src[d];
          }
        scalar_t* out = dst + pid * dst_st.b + hkv * dst_st.h + slot * dst_st.l;
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(sum[d]);
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void prefix_attention_forward(const PrefixAttentionParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t bq = queries_per_block(p);
  const int64_t n_qblocks = (p.len_q + bq - 1) / bq;
  const int64_t rows = (p.heads_q / p.heads_kv) * bq;
  at::parallel_for(0, p.batch * p.heads_kv * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    Workspace<acc_t> ws(rows, p.head_dim, /*backward=*/false, 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qblocks, bh = item / n_qblocks;
      const int64_t i0 = qb * bq;
      forward_block<scalar_t>(p, bh / p.heads_kv, bh % p.heads_kv, i0, std::min(bq, p.len_q - i0), ws);
    }
  });
}

template <typename scalar_t>
void prefix_attention_backward(const PrefixAttentionGradParams& p) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t K = p.prefix_slots, D = p.head_dim, Hkv = p.heads_kv;
  const bool has_prefix =
      p.prefix_grads && p.num_prompts > 0 && K > 0 && p.prefix_partial_k && p.prefix_partial_v;
  if (!p.seq_grads && !has_prefix) return;  // nothing wanted (prefix gradients, if any, are zeros)
  // Per-(row, kv head) prefix gradients; only slots < prefix_len are written and read.
  auto* partial_k = static_cast<acc_t*>(p.prefix_partial_k);
  auto* partial_v = static_cast<acc_t*>(p.prefix_partial_v);
  const int64_t rows = (p.heads_q / Hkv) * queries_per_block(p, kTargetRowsBackward);
  at::parallel_for(0, p.batch * Hkv, 1, [&](int64_t begin, int64_t end) {
    Workspace<acc_t> ws(rows, D, /*backward=*/true, p.len_k, /*softcap=*/p.softcap > 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, hkv = item % Hkv;
      acc_t* pdk = has_prefix ? partial_k + item * K * D : nullptr;
      acc_t* pdv = has_prefix ? partial_v + item * K * D : nullptr;
      if (has_prefix) {
        std::fill(pdk, pdk + K * D, acc_t(0));
        std::fill(pdv, pdv + K * D, acc_t(0));
      }
      backward_row_head<scalar_t>(p, b, hkv, pdk, pdv, ws);
    }
  });
  if (has_prefix) {
    reduce_prefix_grads<scalar_t>(p, partial_k, p.grad_pk_strides, p.grad_prefix_k);
    reduce_prefix_grads<scalar_t>(p, partial_v, p.grad_pv_strides, p.grad_prefix_v);
  }
}

#define SOFTPROMPT_INSTANTIATE(T)                                              \
  template void prefix_attention_forward<T>(const PrefixAttentionParams&); \
  template void prefix_attention_backward<T>(const PrefixAttentionGradParams&);
SOFTPROMPT_FOR_CPU_FLOAT_TYPES(SOFTPROMPT_INSTANTIATE)
#undef SOFTPROMPT_INSTANTIATE

}  // namespace softprompt::cpu
