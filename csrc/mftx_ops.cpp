// mftx.ops._C: sparse candidate gathering and masking over lists of float32 buffers.
//
// The module never links libtorch. Python hands over CPU tensors as NumPy views
// (`t.detach().view(-1).numpy()`), so the wheel works with any torch version.
// Every op checks its buffers while holding the GIL, then releases it for the
// scan. Parallel work is cut into pieces fixed before any OpenMP region starts
// (see Pieces); OpenMP may run a region with fewer threads than asked for, and
// nothing depends on how many it does. Results are bit-for-bit the same as the
// pure-PyTorch twins in mftx/ops/reference.py: order is (value, then global index
// ascending), where the global index runs over the tensors in list order, then
// row-major within each.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#ifndef MFTX_VERSION  // built outside CMakeLists.txt: never taken for a current build
#define MFTX_VERSION "unknown"
#endif
#ifndef MFTX_SOURCE_SHA256
#define MFTX_SOURCE_SHA256 "unknown"
#endif

namespace {

// Below this many elements a loop runs on one thread: OpenMP start-up and
// barrier spinning cost more than they save on small inputs.
constexpr int64_t kGrain = 1 << 16;

struct Entry {
  float v;
  int32_t t;  // tensor index
  int64_t g;  // global index: the order of (t, flat index)
};

// Allocator that default-initialises: large result arrays are not zeroed
// first, their pages are touched by the (threaded) loops that fill them.
template <class T>
struct NoInit : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoInit<U>;
  };
  NoInit() = default;
  template <class U>
  NoInit(const NoInit<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
using Entries = std::vector<Entry, NoInit<Entry>>;

template <bool Largest>
struct Better {
  bool operator()(const Entry& a, const Entry& b) const {
    if (Largest) {
      if (a.v > b.v) return true;
      if (a.v < b.v) return false;
    } else {
      if (a.v < b.v) return true;
      if (a.v > b.v) return false;
    }
    return a.g < b.g;  // ties (including -0.0 == +0.0): earlier position first
  }
};

// A list of 1-D buffers seen as one virtual concatenation.
struct Buffers {
  std::vector<float*> data;
  std::vector<int64_t> offsets;  // size T + 1
  int64_t total() const { return offsets.back(); }
};

Buffers collect(const py::sequence& seq, const char* what, bool writable) {
  Buffers b;
  b.offsets.push_back(0);
  const py::ssize_t n = py::len(seq);
  b.data.reserve(static_cast<size_t>(n));
  for (py::ssize_t i = 0; i < n; ++i) {
    py::object item = seq[i];
    if (!py::isinstance<py::array>(item)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is not a NumPy array");
    }
    auto a = py::reinterpret_borrow<py::array>(item);
    if (!a.dtype().is(py::dtype::of<float>())) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] has dtype " +
                           std::string(py::str(a.dtype())) + ", expected float32");
    }
    if (!(a.flags() & py::array::c_style)) {
      throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] is not contiguous");
    }
    if (writable && !a.writeable()) {
      throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] is read-only");
    }
    b.data.push_back(static_cast<float*>(const_cast<void*>(a.data())));
    b.offsets.push_back(b.offsets.back() + static_cast<int64_t>(a.size()));
  }
  return b;
}

// How many threads to ask OpenMP for: one per kGrain elements, at most `requested`.
int threads_for(int64_t n, int requested) {
#ifdef _OPENMP
  if (n <= kGrain || requested <= 1) return 1;
  return static_cast<int>(std::min<int64_t>(requested, std::max<int64_t>(1, n / kGrain)));
#else
  (void)n;
  (void)requested;
  return 1;
#endif
}

// The range [0, n) cut into `count` contiguous pieces, one per requested thread.
// The pieces, and every buffer indexed by piece, are fixed before a region starts;
// an `omp for` hands them to whatever team OpenMP runs: fewer threads than asked
// for (OMP_THREAD_LIMIT, OMP_DYNAMIC, nested regions) get several pieces each, in
// every region alike, so results never depend on the team. Region bodies are
// noexcept: nothing may throw inside a parallel region (all allocation happens
// before it).
struct Pieces {
  int64_t n;
  int count;
  Pieces(int64_t n_, int requested) : n(n_), count(threads_for(n_, requested)) {}
  int64_t lo(int c) const { return n * c / count; }
  int64_t hi(int c) const { return n * (c + 1) / count; }

  template <class Fn>
  void run(Fn&& fn) const {
    static_assert(noexcept(fn(0)), "parallel region bodies must be noexcept");
    const int m = count;
#pragma omp parallel for num_threads(m) schedule(static, 1) if (m > 1)
    for (int c = 0; c < m; ++c) fn(c);
  }
};

// Calls fn(tensor, local_begin, local_end, global_begin) for the pieces of the
// global range [lo, hi).
template <class Fn>
void for_segments(const Buffers& b, int64_t lo, int64_t hi, Fn&& fn) {
  const size_t T = b.data.size();
  size_t j = static_cast<size_t>(std::upper_bound(b.offsets.begin(), b.offsets.end(), lo) -
                                 b.offsets.begin()) - 1;
  for (; j < T && b.offsets[j] < hi; ++j) {
    const int64_t s = std::max(lo, b.offsets[j]);
    const int64_t e = std::min(hi, b.offsets[j + 1]);
    if (s < e) {
      if (!fn(j, s - b.offsets[j], e - b.offsets[j], s)) return;
    }
  }
}

// Unsigned key whose ascending order is rank order: most extreme value first,
// -0.0 tied with +0.0 (NaN never gets here).
template <bool Largest>
inline uint32_t rank_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u << 1) == 0) u = 0;                          // -0.0 -> +0.0
  u = (u >> 31) ? ~u : (u | 0x80000000u);            // unsigned order == float order
  return Largest ? ~u : u;
}

// Below this many entries a comparison sort is faster than the radix passes.
constexpr int64_t kRadixMin = 1 << 12;

// Sorts into rank order: by value, most extreme first, ties by global index
// ascending (Better<Largest>; the order is total, so every correct sort gives
// the same permutation). Large inputs take a stable LSD radix sort, 8 bits a
// pass, threaded: first on the global index (skipped when the entries already
// come in ascending index order, as gather() produces them), then on the value
// key. Passes in which every entry has the same digit are skipped.
template <bool Largest>
void sort_ranked(Entries& v, bool index_sorted, int nthreads) {
  const int64_t n = static_cast<int64_t>(v.size());
  if (n < kRadixMin) {
    std::sort(v.begin(), v.end(), Better<Largest>());
    return;
  }
  Entries tmp(static_cast<size_t>(n));
  Entry* src = v.data();
  Entry* dst = tmp.data();
  const Pieces pieces(n, nthreads);
  std::vector<std::array<int64_t, 256>> hist(static_cast<size_t>(pieces.count));

  auto pass = [&](auto digit) {
    pieces.run([&](int c) noexcept {
      auto& h = hist[static_cast<size_t>(c)];
      h.fill(0);
      for (int64_t i = pieces.lo(c), hi = pieces.hi(c); i < hi; ++i) ++h[digit(src[i])];
    });
    int64_t start = 0;
    for (int d = 0; d < 256; ++d) {
      int64_t count = 0;
      for (const auto& h : hist) count += h[d];
      if (count == n) return;  // one digit for all: nothing moves
      for (auto& h : hist) {  // piece c's entries after piece c-1's: stable
        const int64_t c = h[d];
        h[d] = start;
        start += c;
      }
    }
    pieces.run([&](int c) noexcept {
      auto& h = hist[static_cast<size_t>(c)];
      for (int64_t i = pieces.lo(c), hi = pieces.hi(c); i < hi; ++i) {
        dst[h[digit(src[i])]++] = src[i];
      }
    });
    std::swap(src, dst);
  };

  if (!index_sorted) {
    int64_t max_g = 0;
    for (const Entry& e : v) max_g = std::max(max_g, e.g);
    for (int shift = 0; shift < 64 && (max_g >> shift) != 0; shift += 8) {
      pass([shift](const Entry& e) noexcept { return static_cast<size_t>((e.g >> shift) & 0xff); });
    }
  }
  for (int shift = 0; shift < 32; shift += 8) {
    pass([shift](const Entry& e) noexcept {
      return static_cast<size_t>((rank_key<Largest>(e.v) >> shift) & 0xffu);
    });
  }
  if (src != v.data()) v.swap(tmp);
}

// A scan's outcome besides its entries: kNone (fine), the global index of the
// first NaN, or kChanged (the buffers changed between two passes over them).
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
constexpr int64_t kChanged = -1;

[[noreturn]] void raise_changed() {
  throw std::runtime_error(
      "the tensors changed while the op read them (another thread wrote to them); "
      "nothing was returned");
}

[[noreturn]] void raise_nan(const Buffers& b, int64_t g, const std::string& what) {
  if (g == kChanged) raise_changed();
  const size_t t = static_cast<size_t>(
      std::upper_bound(b.offsets.begin(), b.offsets.end(), g) - b.offsets.begin() - 1);
  throw py::value_error("NaN in " + what + ": tensor index " + std::to_string(t) +
                        ", flat position " + std::to_string(g - b.offsets[t]));
}

py::tuple to_candidates(const Buffers& b, Entries&& entries, int nthreads) {
  const int64_t m = static_cast<int64_t>(entries.size());
  py::array_t<int64_t> ti(m), fi(m);
  py::array_t<float> val(m);
  int64_t* tp = ti.mutable_data();
  int64_t* fp = fi.mutable_data();
  float* vp = val.mutable_data();
  const Entry* ep = entries.data();
  const int64_t* off = b.offsets.data();
  {
    py::gil_scoped_release release;
    const int nt = threads_for(m, nthreads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t = ep[i].t;
      tp[i] = t;
      fp[i] = ep[i].g - off[t];
      vp[i] = ep[i].v;
    }
  }
  return py::make_tuple(ti, fi, val);
}

// ---------------------------------------------------------------- topk

template <bool Largest>
Entries topk_impl(const Buffers& b, int64_t k, int nthreads, int64_t& nan_at) {
  const int64_t n = b.total();
  const Pieces pieces(n, nthreads);
  const size_t np = static_cast<size_t>(pieces.count);
  // Each piece keeps at most `cap` entries (the k best plus a batch of newcomers),
  // and never more than it has: its buffer is allocated (not touched) up front.
  const int64_t cap = k + std::max<int64_t>(k, 4096);
  std::vector<Entries> bufs(np);
  for (int c = 0; c < pieces.count; ++c) {
    bufs[static_cast<size_t>(c)].resize(
        static_cast<size_t>(std::min(cap, pieces.hi(c) - pieces.lo(c))));
  }
  std::vector<int64_t> kept(np, 0);
  std::vector<int64_t> nan_first(np, kNone);
  const Better<Largest> better;

  pieces.run([&](int c) noexcept {
    Entry* buf = bufs[static_cast<size_t>(c)].data();
    int64_t m = 0;
    int64_t& nan_pos = nan_first[static_cast<size_t>(c)];
    bool full = false;
    float tau = 0.0f;
    auto compact = [&]() noexcept {
      std::nth_element(buf, buf + (k - 1), buf + m, better);
      m = k;
      tau = buf[k - 1].v;  // the worst of the k kept
      full = true;
    };
    // "Maybe": better than tau, or NaN; one comparison either way.
    auto maybe = [](float v, float th) noexcept { return Largest ? !(v <= th) : !(v >= th); };
    for_segments(b, pieces.lo(c), pieces.hi(c), [&](size_t t, int64_t s, int64_t e, int64_t g0) {
      const float* x = b.data[t];
      constexpr int64_t kBlock = 64;
      for (int64_t i = s; i < e; i += kBlock) {
        const int64_t end = std::min(e, i + kBlock);
        if (full) {  // the hot path: most blocks hold nothing better than tau
          const float th = tau;
          unsigned any = 0;
          for (int64_t j = i; j < end; ++j) any |= static_cast<unsigned>(maybe(x[j], th));
          if (!any) continue;
        }
        for (int64_t j = i; j < end; ++j) {
          const float v = x[j];
          if (full && !maybe(v, tau)) continue;
          if (v != v) {
            nan_pos = g0 + (j - s);
            return false;
          }
          buf[m++] = Entry{v, static_cast<int32_t>(t), g0 + (j - s)};
          if (m >= cap) compact();
        }
      }
      return true;
    });
    if (nan_pos == kNone && m > k) compact();
    kept[static_cast<size_t>(c)] = m;
  });
  for (int64_t p : nan_first) {
    if (p != kNone) {
      nan_at = p;
      return {};
    }
  }
  int64_t total = 0;
  for (int64_t m : kept) total += m;
  Entries all;
  all.reserve(static_cast<size_t>(total));
  for (size_t c = 0; c < np; ++c) {
    all.insert(all.end(), bufs[c].begin(), bufs[c].begin() + kept[c]);
    Entries().swap(bufs[c]);
  }
  if (static_cast<int64_t>(all.size()) > k) {
    std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), better);
    all.resize(static_cast<size_t>(k));
  }
  sort_ranked<Largest>(all, false, nthreads);
  return all;
}

int64_t first_nan(const Buffers& b, int nthreads) {
  const Pieces pieces(b.total(), nthreads);
  std::vector<int64_t> firsts(static_cast<size_t>(pieces.count), kNone);
  pieces.run([&](int c) noexcept {
    for_segments(b, pieces.lo(c), pieces.hi(c), [&](size_t t, int64_t s, int64_t e, int64_t g0) {
      const float* x = b.data[t];
      for (int64_t i = s; i < e; ++i) {
        if (x[i] != x[i]) {
          firsts[static_cast<size_t>(c)] = g0 + (i - s);
          return false;
        }
      }
      return true;
    });
  });
  return *std::min_element(firsts.begin(), firsts.end());
}


// ---------------------------------------------------------------- select

// Selection rules for gather(). rule.tensor(t) gives an accessor for tensor t
// with nan(i) (entry i holds a NaN) and keep(i, value) (entry i is selected,
// with this value; false for NaN).
template <bool Below>
struct ThresholdRule {
  const Buffers& b;
  float thr;
  struct Acc {
    const float* x;
    float thr;
    bool nan(int64_t i) const { return x[i] != x[i]; }
    bool keep(int64_t i, float& value) const {
      value = x[i];
      return Below ? value < thr : value > thr;
    }
  };
  Acc tensor(size_t t) const { return Acc{b.data[t], thr}; }
};

struct TowardZeroRule {
  const Buffers& p;
  const Buffers& g;
  double lr;
  struct Acc {
    const float* px;
    const float* gx;
    double lr;
    bool nan(int64_t i) const { return (px[i] != px[i]) | (gx[i] != gx[i]); }
    bool keep(int64_t i, float& value) const {
      // In double, exactly as the reference: |p| - |p - lr * g|.
      const double pd = static_cast<double>(px[i]);
      const double step = lr * static_cast<double>(gx[i]);
      const double d = std::fabs(pd) - std::fabs(pd - step);
      value = static_cast<float>(d);
      return d > 0.0;
    }
  };
  Acc tensor(size_t t) const { return Acc{p.data[t], g.data[t], lr}; }
};

// The entries a rule keeps, in ascending global order, in two threaded passes:
// count per thread (and look for NaN), then write each thread's entries at its
// offset of one exactly sized array. No growing buffers, no concatenation.
// On a NaN, nan_at is the global index of the first one and nothing is kept.
// With limit >= 0, more than limit entries are not written either; *count (if
// given) says how many there are.
template <class Rule>
Entries gather(const Buffers& b, const Rule& rule, int nthreads, int64_t& nan_at,
               int64_t limit = -1, int64_t* count = nullptr) {
  const Pieces pieces(b.total(), nthreads);
  const size_t np = static_cast<size_t>(pieces.count);
  std::vector<int64_t> offset(np + 1, 0);
  std::vector<int64_t> nan_first(np, kNone);
  pieces.run([&](int c) noexcept {
    int64_t kept = 0;
    for_segments(b, pieces.lo(c), pieces.hi(c), [&](size_t t, int64_t s, int64_t e, int64_t g0) {
      const auto acc = rule.tensor(t);
      int64_t m = 0;
      unsigned bad = 0;
      float value;
      for (int64_t i = s; i < e; ++i) {  // branch-free, so it can vectorise
        bad |= static_cast<unsigned>(acc.nan(i));
        m += static_cast<int64_t>(acc.keep(i, value));
      }
      if (bad) {
        for (int64_t i = s; i < e; ++i) {
          if (acc.nan(i)) {
            nan_first[static_cast<size_t>(c)] = g0 + (i - s);
            return false;
          }
        }
      }
      kept += m;
      return true;
    });
    offset[static_cast<size_t>(c) + 1] = kept;
  });
  for (int64_t p : nan_first) {
    if (p != kNone) {
      nan_at = p;
      return {};
    }
  }
  for (size_t c = 0; c < np; ++c) offset[c + 1] += offset[c];
  if (count != nullptr) *count = offset[np];
  if (limit >= 0 && offset[np] > limit) return {};
  Entries out(static_cast<size_t>(offset[np]));
  // Each piece writes into its own slot [offset[c], offset[c + 1]) and never past
  // it, even if the buffers changed since the count (another thread writing to
  // them while the GIL is released): then the counts differ and nan_at says so.
  std::vector<char> changed(np, 0);
  pieces.run([&](int c) noexcept {
    Entry* o = out.data() + offset[static_cast<size_t>(c)];
    Entry* const o_end = out.data() + offset[static_cast<size_t>(c) + 1];
    for_segments(b, pieces.lo(c), pieces.hi(c), [&](size_t t, int64_t s, int64_t e, int64_t g0) {
      const auto acc = rule.tensor(t);
      const int32_t t32 = static_cast<int32_t>(t);
      constexpr int64_t kBlock = 64;
      Entry stage[kBlock];
      float value;
      for (int64_t i = s; i < e; i += kBlock) {
        const int64_t end = std::min(e, i + kBlock);
        // Skip blocks without a kept entry (sparse selections).
        unsigned any = 0;
        for (int64_t j = i; j < end; ++j) any |= static_cast<unsigned>(acc.keep(j, value));
        if (!any) continue;
        int64_t m = 0;  // stage the block without branches, then copy it out
        for (int64_t j = i; j < end; ++j) {
          const bool k = acc.keep(j, value);
          stage[m] = Entry{value, t32, g0 + (j - s)};
          m += static_cast<int64_t>(k);
        }
        if (m > o_end - o) {
          changed[static_cast<size_t>(c)] = 1;
          return false;
        }
        std::memcpy(static_cast<void*>(o), stage, static_cast<size_t>(m) * sizeof(Entry));
        o += m;
      }
      return true;
    });
    if (o != o_end) changed[static_cast<size_t>(c)] = 1;
  });
  if (std::find(changed.begin(), changed.end(), 1) != changed.end()) {
    nan_at = kChanged;
    return {};
  }
  return out;
}

py::tuple select_entries(const py::sequence& arrays, double threshold, bool below, int nthreads) {
  if (std::isnan(threshold)) throw py::value_error("threshold is NaN");
  Buffers b = collect(arrays, "tensors", false);
  // Compared in float32, as torch compares a float32 tensor with a Python float.
  const float thr = static_cast<float>(threshold);
  Entries out;
  int64_t nan_at = kNone;
  {
    py::gil_scoped_release release;
    if (below) {
      out = gather(b, ThresholdRule<true>{b, thr}, nthreads, nan_at);
      if (nan_at == kNone) sort_ranked<false>(out, true, nthreads);
    } else {
      out = gather(b, ThresholdRule<false>{b, thr}, nthreads, nan_at);
      if (nan_at == kNone) sort_ranked<true>(out, true, nthreads);
    }
  }
  if (nan_at != kNone) raise_nan(b, nan_at, "scores");
  return to_candidates(b, std::move(out), nthreads);
}

// ---------------------------------------------------------------- topk, large k

template <bool Largest>
struct KeyRule {  // entries whose rank key is at most tau: at least that good
  const Buffers& b;
  uint32_t tau;
  struct Acc {
    const float* x;
    uint32_t tau;
    bool nan(int64_t i) const { return x[i] != x[i]; }
    bool keep(int64_t i, float& value) const {
      value = x[i];
      return rank_key<Largest>(value) <= tau;
    }
  };
  Acc tensor(size_t t) const { return Acc{b.data[t], tau}; }
};

// From this k on (on inputs of at least 4 * kSampledMinK entries), topk first tries
// topk_sampled: below it the streaming topk_impl is faster.
constexpr int64_t kSampledMinK = 1 << 16;

// Large k: guess from a sample a key threshold that about 1.2 k entries pass,
// gather every entry that good (two streaming passes, ascending index order,
// so the sort needs only the value passes), sort, keep the first k. Exact
// whenever between k and 2k + 65536 entries pass; otherwise (an unlucky
// sample, heavy ties) returns false having written nothing, and the caller
// falls back to topk_impl. Returns true with nan_at set on a NaN.
template <bool Largest>
bool topk_sampled(const Buffers& b, int64_t k, int nthreads, int64_t& nan_at, Entries& out) {
  const int64_t n = b.total();
  constexpr int64_t kRuns = 256;
  constexpr int64_t kRun = 256;  // runs of consecutive entries: cache-friendly
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(kRuns * kRun));
  for (int64_t r = 0; r < kRuns; ++r) {
    const int64_t lo = (n - kRun) * r / (kRuns - 1);
    for_segments(b, lo, lo + kRun, [&](size_t t, int64_t s, int64_t e, int64_t) {
      for (int64_t i = s; i < e; ++i) {
        const float v = b.data[t][i];
        if (v == v) keys.push_back(rank_key<Largest>(v));
      }
      return true;
    });
  }
  const double m = static_cast<double>(keys.size());
  const double expect = static_cast<double>(k) / static_cast<double>(n) * m;
  const double want = 1.05 * expect + 4.0 * std::sqrt(expect) + 16.0;  // ~4 sigma margin
  uint32_t tau = 0xffffffffu;  // everything
  if (want < m) {
    const auto r = keys.begin() + static_cast<std::ptrdiff_t>(want);
    std::nth_element(keys.begin(), r, keys.end());
    tau = *r;
  }
  const int64_t limit = 2 * k + (1 << 16);
  int64_t count = 0;
  Entries kept = gather(b, KeyRule<Largest>{b, tau}, nthreads, nan_at, limit, &count);
  if (nan_at != kNone) return true;
  if (count < k || count > limit) return false;
  sort_ranked<Largest>(kept, true, nthreads);
  kept.resize(static_cast<size_t>(k));
  out = std::move(kept);
  return true;
}

template <bool Largest>
Entries topk_any(const Buffers& b, int64_t k, int nthreads, int64_t& nan_at) {
  Entries out;
  if (k >= kSampledMinK && b.total() >= 4 * kSampledMinK &&
      topk_sampled<Largest>(b, k, nthreads, nan_at, out)) {
    return out;
  }
  return topk_impl<Largest>(b, k, nthreads, nan_at);
}

py::tuple topk(const py::sequence& arrays, int64_t k, bool largest, int nthreads) {
  if (k < 0) throw py::value_error("k must be >= 0, got " + std::to_string(k));
  Buffers b = collect(arrays, "tensors", false);
  const int64_t kk = std::min(k, b.total());
  Entries out;
  int64_t nan_at = kNone;
  {
    py::gil_scoped_release release;
    if (kk == 0) {
      nan_at = first_nan(b, nthreads);
    } else if (largest) {
      out = topk_any<true>(b, kk, nthreads, nan_at);
    } else {
      out = topk_any<false>(b, kk, nthreads, nan_at);
    }
  }
  if (nan_at != kNone) raise_nan(b, nan_at, "scores");
  return to_candidates(b, std::move(out), nthreads);
}

// ---------------------------------------------------------------- toward_zero

py::tuple toward_zero(const py::sequence& params, const py::sequence& grads, double lr,
                      int nthreads) {
  Buffers p = collect(params, "params", false);
  Buffers g = collect(grads, "grads", false);
  if (p.offsets != g.offsets) throw py::value_error("params and grads differ in sizes");
  Entries out;
  int64_t nan_at = kNone;
  {
    py::gil_scoped_release release;
    out = gather(p, TowardZeroRule{p, g, lr}, nthreads, nan_at);
    if (nan_at == kNone) sort_ranked<true>(out, true, nthreads);
  }
  if (nan_at == kChanged) raise_changed();
  if (nan_at != kNone) {
    const size_t t = static_cast<size_t>(
        std::upper_bound(p.offsets.begin(), p.offsets.end(), nan_at) - p.offsets.begin() - 1);
    const int64_t i = nan_at - p.offsets[t];
    raise_nan(p, nan_at, p.data[t][i] != p.data[t][i] ? "params" : "grads");
  }
  return to_candidates(p, std::move(out), nthreads);
}

// ---------------------------------------------------------------- mask / restore

struct Index {
  const int64_t* ti;
  const int64_t* fi;
  int64_t m;
};

Index index_arrays(const py::array& ti, const py::array& fi) {
  for (const py::array* a : {&ti, &fi}) {
    if (!a->dtype().is(py::dtype::of<int64_t>()) || a->ndim() != 1 ||
        !(a->flags() & py::array::c_style)) {
      throw py::type_error("candidate indices must be contiguous 1-D int64 arrays");
    }
  }
  if (ti.size() != fi.size()) throw py::value_error("tensor_index and flat_index differ in length");
  return Index{static_cast<const int64_t*>(ti.data()), static_cast<const int64_t*>(fi.data()),
               static_cast<int64_t>(ti.size())};
}

// Returns the position of the first candidate outside the buffers, or -1.
int64_t first_invalid(const Buffers& b, const Index& idx, int nthreads) {
  const int64_t T = static_cast<int64_t>(b.data.size());
  int64_t bad = kNone;
  const int nt = threads_for(idx.m, nthreads);
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : bad) if (nt > 1)
  for (int64_t i = 0; i < idx.m; ++i) {
    const int64_t t = idx.ti[i];
    const int64_t f = idx.fi[i];
    const bool ok = t >= 0 && t < T && f >= 0 && f < b.offsets[t + 1] - b.offsets[t];
    if (!ok && i < bad) bad = i;
  }
  return bad == kNone ? -1 : bad;
}

void check_index(const Buffers& b, const Index& idx, int nthreads) {
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = first_invalid(b, idx, nthreads);
  }
  if (bad >= 0) {
    throw py::index_error("candidate " + std::to_string(bad) + " (tensor index " +
                          std::to_string(idx.ti[bad]) + ", flat index " +
                          std::to_string(idx.fi[bad]) + ") is out of range");
  }
}

// Bit copies through 32-bit integers: NaN payloads and -0.0 survive. Duplicate
// candidates store the same bits from several threads; relaxed atomic stores
// keep that well defined.
inline void store_bits(float* dst, uint32_t bits) {
  __atomic_store_n(reinterpret_cast<uint32_t*>(dst), bits, __ATOMIC_RELAXED);
}
inline uint32_t load_bits(const float* src) {
  return __atomic_load_n(reinterpret_cast<const uint32_t*>(src), __ATOMIC_RELAXED);
}

py::array_t<float> mask(const py::sequence& arrays, const py::array& ti, const py::array& fi,
                        int nthreads) {
  Buffers b = collect(arrays, "tensors", true);
  Index idx = index_arrays(ti, fi);
  check_index(b, idx, nthreads);
  py::array_t<float> saved(idx.m);
  float* sp = saved.mutable_data();
  {
    py::gil_scoped_release release;
    const int nt = threads_for(idx.m, nthreads);
    // All reads happen before any write, so duplicates all save the original.
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < idx.m; ++i) {
        store_bits(sp + i, load_bits(b.data[idx.ti[i]] + idx.fi[i]));
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < idx.m; ++i) {
        store_bits(b.data[idx.ti[i]] + idx.fi[i], 0u);
      }
    }
  }
  return saved;
}

void restore(const py::sequence& arrays, const py::array& ti, const py::array& fi,
             const py::array& saved, int nthreads) {
  Buffers b = collect(arrays, "tensors", true);
  Index idx = index_arrays(ti, fi);
  if (!saved.dtype().is(py::dtype::of<float>()) || saved.ndim() != 1 ||
      !(saved.flags() & py::array::c_style)) {
    throw py::type_error("saved must be a contiguous 1-D float32 array");
  }
  if (saved.size() != idx.m) throw py::value_error("saved and candidates differ in length");
  check_index(b, idx, nthreads);
  const float* sp = static_cast<const float*>(saved.data());
  {
    py::gil_scoped_release release;
    const int nt = threads_for(idx.m, nthreads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t i = 0; i < idx.m; ++i) {
      store_bits(b.data[idx.ti[i]] + idx.fi[i], load_bits(sp + i));
    }
  }
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mftx compiled ops: top-k, threshold selection, first-order rule, masking";
  m.def("topk", &topk, py::arg("arrays"), py::arg("k"), py::arg("largest"), py::arg("num_threads"),
        "(tensor_index, flat_index, value) of the k most extreme values, best first");
  m.def("select", &select_entries, py::arg("arrays"), py::arg("threshold"), py::arg("below"),
        py::arg("num_threads"), "entries strictly below/above threshold, most extreme first");
  m.def("toward_zero", &toward_zero, py::arg("params"), py::arg("grads"), py::arg("lr"),
        py::arg("num_threads"), "entries with |p - lr g| < |p|, value |p| - |p - lr g|");
  m.def("mask", &mask, py::arg("arrays"), py::arg("tensor_index"), py::arg("flat_index"),
        py::arg("num_threads"), "zero the entries in place; returns their previous values");
  m.def("restore", &restore, py::arg("arrays"), py::arg("tensor_index"), py::arg("flat_index"),
        py::arg("saved"), py::arg("num_threads"), "write saved values back bit for bit");
  m.def("has_openmp", &has_openmp);
  m.attr("grain") = kGrain;
  // Set by CMakeLists.txt; mftx/ops/_compiled.py refuses a module whose values
  // differ from the package's version and source (a stale build).
  m.attr("__version__") = MFTX_VERSION;
  m.attr("__source_sha256__") = MFTX_SOURCE_SHA256;
}
