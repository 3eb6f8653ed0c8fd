// mftx._C: sparse candidate gathering and masking over lists of float32 buffers.
//
// The module never links libtorch. Python hands over CPU tensors as NumPy views
// (`t.detach().view(-1).numpy()`), so the wheel works with any torch version.
// Every op checks its buffers while holding the GIL, then releases it for the
// scan. Results are bit-for-bit the same as the pure-PyTorch twins in
// mftx/ops/reference.py: order is (value, then global index ascending), where the
// global index runs over the tensors in list order, then row-major within each.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#if defined(__GLIBCXX__)
#include <parallel/algorithm>
#define MFTX_GNU_PARALLEL 1
#endif
#endif

namespace py = pybind11;

namespace {

// Below this many elements a loop runs on one thread: OpenMP start-up and
// barrier spinning cost more than they save on small inputs.
constexpr int64_t kGrain = 1 << 16;

struct Entry {
  float v;
  int64_t g;  // global index
};

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

int current_thread() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

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

template <class Cmp>
void sort_entries(std::vector<Entry>& v, Cmp cmp, int nthreads) {
#ifdef MFTX_GNU_PARALLEL
  int nt = threads_for(static_cast<int64_t>(v.size()), nthreads);
  if (nt > 1) {
    __gnu_parallel::sort(v.begin(), v.end(), cmp, __gnu_parallel::default_parallel_tag(nt));
    return;
  }
#else
  (void)nthreads;
#endif
  std::sort(v.begin(), v.end(), cmp);
}

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

[[noreturn]] void raise_nan(const Buffers& b, int64_t g, const std::string& what) {
  const size_t t = static_cast<size_t>(
      std::upper_bound(b.offsets.begin(), b.offsets.end(), g) - b.offsets.begin() - 1);
  throw py::value_error("NaN in " + what + ": tensor index " + std::to_string(t) +
                        ", flat position " + std::to_string(g - b.offsets[t]));
}

py::tuple to_candidates(const Buffers& b, std::vector<Entry>&& entries, int nthreads) {
  const int64_t m = static_cast<int64_t>(entries.size());
  py::array_t<int64_t> ti(m), fi(m);
  py::array_t<float> val(m);
  int64_t* tp = ti.mutable_data();
  int64_t* fp = fi.mutable_data();
  float* vp = val.mutable_data();
  const Entry* ep = entries.data();
  const int64_t* off = b.offsets.data();
  const int64_t T = static_cast<int64_t>(b.data.size());
  {
    py::gil_scoped_release release;
    const int nt = threads_for(m, nthreads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t i = 0; i < m; ++i) {
      const int64_t g = ep[i].g;
      const int64_t t = std::upper_bound(off, off + T + 1, g) - off - 1;
      tp[i] = t;
      fp[i] = g - off[t];
      vp[i] = ep[i].v;
    }
  }
  return py::make_tuple(ti, fi, val);
}

// ---------------------------------------------------------------- topk

template <bool Largest>
std::vector<Entry> topk_impl(const Buffers& b, int64_t k, int nthreads, int64_t& nan_at) {
  const int64_t n = b.total();
  const int nt = threads_for(n, nthreads);
  std::vector<std::vector<Entry>> bufs(static_cast<size_t>(nt));
  std::vector<int64_t> nan_first(static_cast<size_t>(nt), kNone);
  const Better<Largest> better;
  const int64_t cap = k + std::max<int64_t>(k, 4096);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = current_thread();
    const int64_t lo = n * tid / nt;
    const int64_t hi = n * (tid + 1) / nt;
    std::vector<Entry>& buf = bufs[static_cast<size_t>(tid)];
    int64_t& nan_pos = nan_first[static_cast<size_t>(tid)];
    bool full = false;
    float tau = 0.0f;
    auto compact = [&]() {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), better);
      buf.resize(static_cast<size_t>(k));
      tau = buf[static_cast<size_t>(k - 1)].v;  // the worst of the k kept
      full = true;
    };
    for_segments(b, lo, hi, [&](size_t t, int64_t s, int64_t e, int64_t g0) {
      const float* x = b.data[t];
      for (int64_t i = s; i < e; ++i) {
        const float v = x[i];
        // One comparison on the hot path: false for "not better than tau",
        // true for a candidate or a NaN.
        const bool maybe = !full || (Largest ? !(v <= tau) : !(v >= tau));
        if (maybe) {
          if (v != v) {
            nan_pos = g0 + (i - s);
            return false;
          }
          buf.push_back(Entry{v, g0 + (i - s)});
          if (static_cast<int64_t>(buf.size()) >= cap) compact();
        }
      }
      return true;
    });
  }
  for (int64_t p : nan_first) {
    if (p != kNone) {
      nan_at = p;
      return {};
    }
  }
  size_t total = 0;
  for (auto& v : bufs) total += v.size();
  std::vector<Entry> all;
  all.reserve(total);
  for (auto& v : bufs) {
    all.insert(all.end(), v.begin(), v.end());
    std::vector<Entry>().swap(v);
  }
  if (static_cast<int64_t>(all.size()) > k) {
    std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), better);
    all.resize(static_cast<size_t>(k));
  }
  sort_entries(all, better, nthreads);
  return all;
}

int64_t first_nan(const Buffers& b, int nthreads) {
  const int64_t n = b.total();
  const int nt = threads_for(n, nthreads);
  std::vector<int64_t> firsts(static_cast<size_t>(nt), kNone);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = current_thread();
    for_segments(b, n * tid / nt, n * (tid + 1) / nt,
                 [&](size_t t, int64_t s, int64_t e, int64_t g0) {
                   const float* x = b.data[t];
                   for (int64_t i = s; i < e; ++i) {
                     if (x[i] != x[i]) {
                       firsts[static_cast<size_t>(tid)] = g0 + (i - s);
                       return false;
                     }
                   }
                   return true;
                 });
  }
  return *std::min_element(firsts.begin(), firsts.end());
}

py::tuple topk(const py::sequence& arrays, int64_t k, bool largest, int nthreads) {
  if (k < 0) throw py::value_error("k must be >= 0, got " + std::to_string(k));
  Buffers b = collect(arrays, "tensors", false);
  const int64_t kk = std::min(k, b.total());
  std::vector<Entry> out;
  int64_t nan_at = kNone;
  {
    py::gil_scoped_release release;
    if (kk == 0) {
      nan_at = first_nan(b, nthreads);
    } else if (largest) {
      out = topk_impl<true>(b, kk, nthreads, nan_at);
    } else {
      out = topk_impl<false>(b, kk, nthreads, nan_at);
    }
  }
  if (nan_at != kNone) raise_nan(b, nan_at, "scores");
  return to_candidates(b, std::move(out), nthreads);
}

// ---------------------------------------------------------------- select

// Gathers the entries for which keep(v, &value) is true, thread by thread, in
// global order. pred returns 0 (skip), 1 (keep, value set) or -1 (NaN: stop).
template <class Pred>
std::vector<Entry> gather(const Buffers& b, int nthreads, int64_t& nan_at, Pred pred) {
  const int64_t n = b.total();
  const int nt = threads_for(n, nthreads);
  std::vector<std::vector<Entry>> bufs(static_cast<size_t>(nt));
  std::vector<int64_t> nan_first(static_cast<size_t>(nt), kNone);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = current_thread();
    std::vector<Entry>& buf = bufs[static_cast<size_t>(tid)];
    for_segments(b, n * tid / nt, n * (tid + 1) / nt,
                 [&](size_t t, int64_t s, int64_t e, int64_t g0) {
                   for (int64_t i = s; i < e; ++i) {
                     float val;
                     const int r = pred(t, i, &val);
                     if (r > 0) {
                       buf.push_back(Entry{val, g0 + (i - s)});
                     } else if (r < 0) {
                       nan_first[static_cast<size_t>(tid)] = g0 + (i - s);
                       return false;
                     }
                   }
                   return true;
                 });
  }
  for (int64_t p : nan_first) {
    if (p != kNone) {
      nan_at = p;
      return {};
    }
  }
  size_t total = 0;
  for (auto& v : bufs) total += v.size();
  std::vector<Entry> all;
  all.reserve(total);
  for (auto& v : bufs) {
    all.insert(all.end(), v.begin(), v.end());
    std::vector<Entry>().swap(v);
  }
  return all;
}

py::tuple select_entries(const py::sequence& arrays, double threshold, bool below, int nthreads) {
  if (std::isnan(threshold)) throw py::value_error("threshold is NaN");
  Buffers b = collect(arrays, "tensors", false);
  // Compared in float32, as torch compares a float32 tensor with a Python float.
  const float thr = static_cast<float>(threshold);
  std::vector<Entry> out;
  int64_t nan_at = kNone;
  {
    py::gil_scoped_release release;
    if (below) {
      out = gather(b, nthreads, nan_at, [&](size_t t, int64_t i, float* val) {
        const float v = b.data[t][i];
        if (v < thr) {
          *val = v;
          return 1;
        }
        return v != v ? -1 : 0;
      });
      if (nan_at == kNone) sort_entries(out, Better<false>(), nthreads);
    } else {
      out = gather(b, nthreads, nan_at, [&](size_t t, int64_t i, float* val) {
        const float v = b.data[t][i];
        if (v > thr) {
          *val = v;
          return 1;
        }
        return v != v ? -1 : 0;
      });
      if (nan_at == kNone) sort_entries(out, Better<true>(), nthreads);
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
  std::vector<Entry> out;
  int64_t nan_at = kNone;
  {
    py::gil_scoped_release release;
    out = gather(p, nthreads, nan_at, [&](size_t t, int64_t i, float* val) {
      const float pv = p.data[t][i];
      const float gv = g.data[t][i];
      if (pv != pv || gv != gv) return -1;
      // In double, exactly as the reference: |p| - |p - lr * g|.
      const double pd = static_cast<double>(pv);
      const double step = lr * static_cast<double>(gv);
      const double d = std::fabs(pd) - std::fabs(pd - step);
      if (d > 0.0) {
        *val = static_cast<float>(d);
        return 1;
      }
      return 0;
    });
    if (nan_at == kNone) sort_entries(out, Better<true>(), nthreads);
  }
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
}
