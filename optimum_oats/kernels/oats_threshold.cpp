// The thresholding half of one fast-OATS iteration, fused into one pass over the matrix.
//
// In PyTorch this step is ~10 full passes (abs, compare, count, re-select the rows whose count moved, multiply by
// the mask, the error's subtraction and norm, W - S for the next power step and its norm); the matrix does not fit
// in cache, so they cost more than the iteration's three GEMMs. Here each group (a row, or M consecutive entries
// for N:M) is read once: count the entries above last iteration's threshold; only if the count is not `keep`,
// select the new boundary with std::nth_element and take the midpoint between the keep-th and (keep+1)-th largest
// |r| (the same threshold as optimum_oats.algorithms.oats._topk_and_midpoints). Exact ties at the boundary keep the
// lowest column indices, so exactly `keep` entries are kept.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

constexpr int kLanes = 16;        // independent partial sums, so the compiler can vectorise the reductions

// Keep exactly `keep` entries of a group whose boundary scores tie: largest |r| first, lower index on ties.
void keep_exactly(const float* r, int64_t width, int64_t keep, std::vector<int64_t>& order, uint8_t* kept) {
  order.resize(width);
  std::iota(order.begin(), order.end(), 0);
  std::nth_element(order.begin(), order.begin() + keep, order.end(), [r](int64_t a, int64_t b) {
    const float fa = std::fabs(r[a]), fb = std::fabs(r[b]);
    return fa > fb || (fa == fb && a < b);
  });
  std::fill(kept, kept + width, 0);
  for (int64_t i = 0; i < keep; ++i) kept[order[i]] = 1;
}

// Midpoint between the keep-th and (keep+1)-th largest |r| of a group, 0 < keep < width. `count` entries exceed
// the old threshold `t` (NaN: unknown). A warm threshold is off by a few entries, so only the side of `t` holding
// the new boundary is searched.
float boundary_midpoint(const float* r, int64_t width, int64_t keep, float t, int64_t count,
                        std::vector<float>& scratch) {
  scratch.clear();
  int64_t place;  // the boundary's place in `scratch` after nth_element; its neighbour is the extreme before it
  bool ascending;
  if (std::isnan(t)) {
    for (int64_t j = 0; j < width; ++j) scratch.push_back(std::fabs(r[j]));
    place = width - keep, ascending = true;  // ascending: the lowest kept score lands here
  } else if (count > keep) {  // moved up: among the scores above t, the (count - keep)-th smallest is the highest dropped
    for (int64_t j = 0; j < width; ++j) {
      if (std::fabs(r[j]) > t) scratch.push_back(std::fabs(r[j]));
    }
    place = count - keep, ascending = true;
  } else {  // moved down: among the scores at or below t, the (keep - count)-th largest is the lowest kept
    for (int64_t j = 0; j < width; ++j) {
      if (!(std::fabs(r[j]) > t)) scratch.push_back(std::fabs(r[j]));
    }
    place = keep - count, ascending = false;
  }
  if (ascending) {
    std::nth_element(scratch.begin(), scratch.begin() + place, scratch.end());
    return (*std::max_element(scratch.begin(), scratch.begin() + place) + scratch[place]) / 2;
  }
  std::nth_element(scratch.begin(), scratch.begin() + place, scratch.end(), std::greater<float>());
  return (*std::min_element(scratch.begin(), scratch.begin() + place) + scratch[place]) / 2;
}

// One pass over a group: S (kept entries of r), its mask, work = w - S, and the squared norms of r - S and work.
// `t` NaN: the mask is given (ties); else the mask is |r| > t, computed here. Branch-free selects in 16 independent
// lanes let the compiler vectorise the loop and its reductions.
void fill_row(const float* __restrict__ r, const float* __restrict__ w, float* __restrict__ s, float* __restrict__ k,
              uint8_t* __restrict__ m, int64_t width, float t, double& drop, double& rest) {
  const bool given = std::isnan(t);
  float drop_lanes[kLanes] = {}, rest_lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= width; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float rv = r[j + l];
      const bool kept = given ? m[j + l] != 0 : std::fabs(rv) > t;
      const float sv = kept ? rv : 0.0f, left = rv - sv, next = w[j + l] - sv;
      m[j + l] = kept;
      s[j + l] = sv;
      k[j + l] = next;
      drop_lanes[l] += left * left;
      rest_lanes[l] += next * next;
    }
  }
  for (; j < width; ++j) {
    const float rv = r[j];
    const bool kept = given ? m[j] != 0 : std::fabs(rv) > t;
    const float sv = kept ? rv : 0.0f, left = rv - sv, next = w[j] - sv;
    m[j] = kept;
    s[j] = sv;
    k[j] = next;
    drop += static_cast<double>(left) * left;
    rest += static_cast<double>(next) * next;
  }
  for (int l = 0; l < kLanes; ++l) {
    drop += drop_lanes[l];
    rest += rest_lanes[l];
  }
}

int64_t count_above(const float* r, int64_t width, float t) {
  int64_t count = 0;
  for (int64_t j = 0; j < width; ++j) count += std::fabs(r[j]) > t;
  return count;
}

}  // namespace

// residual, scaled: (groups, width) float32 contiguous; threshold: (groups,) float32, read and updated in place
// (NaN = unknown); sparse, work: (groups, width) float32 and mask: (groups, width) bool, all written.
// sparse = residual where kept else 0; work = scaled - sparse. Returns (||residual - sparse||^2, ||work||^2).
std::tuple<double, double> oats_threshold_step(const at::Tensor& residual, const at::Tensor& scaled, int64_t keep,
                                               at::Tensor& threshold, at::Tensor& sparse, at::Tensor& mask,
                                               at::Tensor& work) {
  TORCH_CHECK(residual.dim() == 2 && residual.device().is_cpu(), "residual must be a 2-D CPU tensor");
  const int64_t groups = residual.size(0), width = residual.size(1);
  for (const at::Tensor* t : {&residual, &scaled, static_cast<const at::Tensor*>(&sparse),
                              static_cast<const at::Tensor*>(&work)}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == residual.sizes(),
                "residual, scaled, sparse and work must be contiguous float32 of one shape");
  }
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == residual.sizes(),
              "mask must be contiguous bool of the residual's shape");
  TORCH_CHECK(threshold.scalar_type() == at::kFloat && threshold.is_contiguous() && threshold.numel() == groups,
              "threshold must be contiguous float32 with one entry per group");
  TORCH_CHECK(0 <= keep && keep <= width, "keep must be in [0, ", width, "], got ", keep);
  const float* rp = residual.data_ptr<float>();
  const float* wp = scaled.data_ptr<float>();
  float* tp = threshold.data_ptr<float>();
  float* sp = sparse.data_ptr<float>();
  float* kp = work.data_ptr<float>();
  auto* mp = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  std::vector<double> dropped(groups), energy(groups);  // per group, summed in order below: thread-count independent
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    std::vector<int64_t> order;
    for (int64_t g = begin; g < end; ++g) {
      const float* r = rp + g * width;
      uint8_t* m = mp + g * width;
      float t = tp[g];
      int64_t count = std::isnan(t) ? -1 : count_above(r, width, t);
      if (count != keep) {
        if (keep == 0 || keep == width) {  // all or nothing: any threshold outside the scores separates them
          t = keep ? -INFINITY : INFINITY;
        } else {
          t = boundary_midpoint(r, width, keep, t, count, scratch);
        }
        tp[g] = t;
        count = count_above(r, width, t);
      }
      const bool separated = count == keep;  // else exact ties at the boundary: keep exactly `keep` by index
      if (!separated) keep_exactly(r, width, keep, order, m);
      double drop = 0, rest = 0;
      fill_row(r, wp + g * width, sp + g * width, kp + g * width, m, width, separated ? t : NAN, drop, rest);
      dropped[g] = drop;
      energy[g] = rest;
    }
  });
  return {std::accumulate(dropped.begin(), dropped.end(), 0.0), std::accumulate(energy.begin(), energy.end(), 0.0)};
}
