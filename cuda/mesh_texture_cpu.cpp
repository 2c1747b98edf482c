// Bilinear texture lookup (mesh_raster.texture), cpu tier (C++/OpenMP) with a hand-written backward.
//
// Semantics: lift3d/kernels/mesh_raster.py (the reference tier of `texture` is the definition).
// Per output pixel with texture coordinates (u, v) on a [Ht, Wt] texture:
//   x = u * Wt - 0.5, y = v * Ht - 0.5, x0 = floor(x), y0 = floor(y), fx = x - x0, fy = y - y0,
//   taps at columns x0, x0 + 1 and rows y0, y0 + 1, each wrapped (remainder, result in [0, size))
//   or clamped to [0, size - 1];
//   top = t00 (1 - fx) + t01 fx, bottom = t10 (1 - fx) + t11 fx, out = top (1 - fy) + bottom fy.
// The float32 operations are the reference's, in the reference's order. floor has no gradient, so
// d out / d u = Wt * d out / d fx and d out / d v = Ht * d out / d fy.
//
// Parallelism: the forward and grad_uv are per pixel (OpenMP over pixels). grad_tex is a scatter
// and uses no float atomics: the pixels that read one texture image are cut into a fixed number of
// chunks that depends only on the shapes (never on the thread count); each chunk adds into its own
// partial texture in pixel order, and the partials are summed in chunk order. Results are
// bit-identical run to run and for any thread count.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

namespace {

constexpr const char* kForward = "mesh_raster_texture_forward";
constexpr const char* kBackward = "mesh_raster_texture_backward";

// Chunks of pixels per texture image for the grad_tex scatter: enough work items to keep a few
// cores busy when the texture is shared, but no chunk under kMinChunkPixels (each chunk costs a
// zeroed partial texture).
constexpr int64_t kTargetChunks = 8;
constexpr int64_t kMinChunkPixels = 4096;

void check_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu tier): ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, " (cpu tier): ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (cpu tier): ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == 4, op, " (cpu tier): ", name, " must have 4 dims, got shape ", t.sizes());
}

void check_inputs(const at::Tensor& tex, const at::Tensor& uv, const char* op) {
  check_tensor(tex, op, "tex");
  check_tensor(uv, op, "uv");
  TORCH_CHECK(uv.size(3) == 2, op, ": uv must be [B, H, W, 2], got ", uv.sizes());
  TORCH_CHECK(tex.size(0) == 1 || tex.size(0) == uv.size(0), op, ": tex has batch ", tex.size(0), ", uv has ",
              uv.size(0), ": they must match or tex must have batch 1");
  TORCH_CHECK(tex.size(1) > 0 && tex.size(2) > 0 && tex.size(3) > 0, op, ": tex must be non-empty, got ", tex.sizes());
}

// floor(x) as an index; values beyond +-2^40 (and NaN, whose fractions make the output NaN anyway)
// are pinned so the conversion is defined. Wrap and clamp give the same texel for a pinned value
// as for the original wherever the reference's own conversion is exact.
inline int64_t floor_index(float x0) {
  constexpr float kLimit = 1099511627776.0f;  // 2^40
  if (!(x0 > -kLimit)) return x0 != x0 ? 0 : -static_cast<int64_t>(kLimit);
  if (x0 > kLimit) return static_cast<int64_t>(kLimit);
  return static_cast<int64_t>(x0);
}

inline int64_t wrap_or_clamp(int64_t index, int64_t size, bool wrap) {
  if (wrap) {
    const int64_t r = index % size;
    return r < 0 ? r + size : r;  // torch.remainder: the sign of the divisor
  }
  return std::min(std::max(index, int64_t{0}), size - 1);
}

// The four taps of one pixel: flat texel offsets (row * Wt + column, times C) and fractions.
struct Taps {
  int64_t o00, o01, o10, o11;
  float fx, fy;
};

inline Taps make_taps(float u, float v, int64_t Ht, int64_t Wt, int64_t C, bool wrap) {
  const float x = u * static_cast<float>(Wt) - 0.5f;
  const float y = v * static_cast<float>(Ht) - 0.5f;
  const float x0 = std::floor(x), y0 = std::floor(y);
  const int64_t ix0 = floor_index(x0), iy0 = floor_index(y0);
  const int64_t c0 = wrap_or_clamp(ix0, Wt, wrap), c1 = wrap_or_clamp(ix0 + 1, Wt, wrap);
  const int64_t r0 = wrap_or_clamp(iy0, Ht, wrap), r1 = wrap_or_clamp(iy0 + 1, Ht, wrap);
  return {(r0 * Wt + c0) * C, (r0 * Wt + c1) * C, (r1 * Wt + c0) * C, (r1 * Wt + c1) * C, x - x0, y - y0};
}

at::Tensor mesh_raster_texture_forward(const at::Tensor& tex, const at::Tensor& uv, bool wrap) {
  check_inputs(tex, uv, kForward);
  const int64_t B = uv.size(0), H = uv.size(1), W = uv.size(2), HW = H * W, N = B * HW;
  const int64_t Bt = tex.size(0), Ht = tex.size(1), Wt = tex.size(2), C = tex.size(3);
  at::Tensor out = at::empty({B, H, W, C}, tex.options());
  const float* p_tex = tex.data_ptr<float>();
  const float* p_uv = uv.data_ptr<float>();
  float* p_out = out.data_ptr<float>();
  const int64_t tex_stride = Ht * Wt * C;

#pragma omp parallel for schedule(static) if (N > 1024)
  for (int64_t p = 0; p < N; ++p) {
    const Taps t = make_taps(p_uv[2 * p], p_uv[2 * p + 1], Ht, Wt, C, wrap);
    const float* image = p_tex + (Bt == 1 ? 0 : p / HW) * tex_stride;
    const float gx = 1.0f - t.fx, gy = 1.0f - t.fy;
    float* o = p_out + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const float top = image[t.o00 + c] * gx + image[t.o01 + c] * t.fx;
      const float bottom = image[t.o10 + c] * gx + image[t.o11 + c] * t.fx;
      o[c] = top * gy + bottom * t.fy;
    }
  }
  return out;
}

// Returns (grad_tex, grad_uv); an output not asked for is returned empty (the autograd wrapper
// drops it).
std::tuple<at::Tensor, at::Tensor> mesh_raster_texture_backward(const at::Tensor& tex, const at::Tensor& uv,
                                                                const at::Tensor& grad_output, bool wrap,
                                                                bool need_tex, bool need_uv) {
  check_inputs(tex, uv, kBackward);
  check_tensor(grad_output, kBackward, "grad_output");
  const int64_t B = uv.size(0), H = uv.size(1), W = uv.size(2), HW = H * W;
  const int64_t Bt = tex.size(0), Ht = tex.size(1), Wt = tex.size(2), C = tex.size(3);
  TORCH_CHECK(grad_output.size(0) == B && grad_output.size(1) == H && grad_output.size(2) == W &&
                  grad_output.size(3) == C,
              kBackward, ": grad_output must be [B, H, W, C] = [", B, ", ", H, ", ", W, ", ", C, "], got ",
              grad_output.sizes());
  const int64_t tex_stride = Ht * Wt * C;
  at::Tensor grad_uv = at::empty({need_uv ? B : 0, H, W, 2}, uv.options());
  const float* p_tex = tex.data_ptr<float>();
  const float* p_uv = uv.data_ptr<float>();
  const float* p_g = grad_output.data_ptr<float>();
  float* p_guv = need_uv ? grad_uv.data_ptr<float>() : nullptr;

  // Pixels reading texture image `image`: [image * span, (image + 1) * span) of the flat pixel
  // index (all B * H * W pixels when the texture is shared). Fixed chunking: see the file comment.
  const int64_t span = Bt == 1 ? B * HW : HW;
  int64_t chunks = 1;
  if (need_tex && Bt < kTargetChunks) {
    chunks = std::max<int64_t>(1, std::min((kTargetChunks + Bt - 1) / Bt, span / kMinChunkPixels));
  }
  // With one chunk per image the scatter adds straight into (zeroed) grad_tex; otherwise each chunk
  // has its own partial texture, left uninitialised here and zeroed by its work item (in parallel).
  at::Tensor grad_tex = need_tex && chunks == 1 ? at::zeros({Bt, Ht, Wt, C}, tex.options())
                                                : at::empty({need_tex ? Bt : 0, Ht, Wt, C}, tex.options());
  std::unique_ptr<float[]> partial(need_tex && chunks > 1 ? new float[Bt * chunks * tex_stride] : nullptr);
  const int64_t items = Bt * chunks;
  float* p_gt = need_tex ? grad_tex.data_ptr<float>() : nullptr;
  if (!need_tex && !need_uv) return {grad_tex, grad_uv};

#pragma omp parallel for schedule(dynamic, 1) if (items > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t image = item / chunks, chunk = item % chunks;
    const int64_t first = image * span + span * chunk / chunks, last = image * span + span * (chunk + 1) / chunks;
    const float* texels = p_tex + image * tex_stride;
    float* sink = nullptr;
    if (need_tex && chunks > 1) {
      sink = partial.get() + item * tex_stride;
      std::fill(sink, sink + tex_stride, 0.0f);
    } else if (need_tex) {
      sink = p_gt + image * tex_stride;
    }
    for (int64_t p = first; p < last; ++p) {
      const Taps t = make_taps(p_uv[2 * p], p_uv[2 * p + 1], Ht, Wt, C, wrap);
      const float gx = 1.0f - t.fx, gy = 1.0f - t.fy;
      const float* g = p_g + p * C;
      if (need_uv) {
        float d_fx = 0.0f, d_fy = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
          const float t00 = texels[t.o00 + c], t01 = texels[t.o01 + c];
          const float t10 = texels[t.o10 + c], t11 = texels[t.o11 + c];
          const float top = t00 * gx + t01 * t.fx, bottom = t10 * gx + t11 * t.fx;
          d_fx += g[c] * (gy * (t01 - t00) + t.fy * (t11 - t10));
          d_fy += g[c] * (bottom - top);
        }
        p_guv[2 * p] = d_fx * static_cast<float>(Wt);
        p_guv[2 * p + 1] = d_fy * static_cast<float>(Ht);
      }
      if (need_tex) {
        const float w00 = gx * gy, w01 = t.fx * gy, w10 = gx * t.fy, w11 = t.fx * t.fy;
        for (int64_t c = 0; c < C; ++c) {
          sink[t.o00 + c] += g[c] * w00;
          sink[t.o01 + c] += g[c] * w01;
          sink[t.o10 + c] += g[c] * w10;
          sink[t.o11 + c] += g[c] * w11;
        }
      }
    }
  }

  if (need_tex && chunks > 1) {
    // Sum the partials in chunk order (parallel over texels: each texel's order is fixed).
    const int64_t total = Bt * tex_stride;
#pragma omp parallel for schedule(static) if (total > 16384)
    for (int64_t i = 0; i < total; ++i) {
      const int64_t image = i / tex_stride, offset = i % tex_stride;
      const float* source = partial.get() + image * chunks * tex_stride + offset;
      float sum = 0.0f;
      for (int64_t k = 0; k < chunks; ++k) sum += source[k * tex_stride];
      p_gt[i] = sum;
    }
  }
  return {grad_tex, grad_uv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lift3d_cpu, m) {
  m.def("mesh_raster_texture_forward(Tensor tex, Tensor uv, bool wrap) -> Tensor", &mesh_raster_texture_forward);
  m.def(
      "mesh_raster_texture_backward(Tensor tex, Tensor uv, Tensor grad_output, bool wrap, bool need_tex, "
      "bool need_uv) -> (Tensor grad_tex, Tensor grad_uv)",
      &mesh_raster_texture_backward);
}
