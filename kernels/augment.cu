// Augmentation on the device: the loader sends raw u8 pixels (a quarter of the bytes of
// f32 images) with each sample's crop offset and flip; this kernel crops (as a shift of
// a zero-padded image), mirrors and normalises, exactly as the CPU path
// (transforms.rs: shift, hflip, normalize_into) does, and may mix each image with a
// partner image as Mixup/CutMix (data/mixup.rs: Mix::apply) does. Images are square,
// `side` pixels a side (the batch's geometry; 32 for CIFAR-10).
#include "common.cuh"

// Image s's normalised value at (c, y, x) after its crop and flip: geom holds
// (dy, dx, flip) per image.
__device__ __forceinline__ float fv_augment_at(const unsigned char* __restrict__ img, const int* __restrict__ geom,
    long s, int c, int y, int x, int side, float mean, float sd) {
  const long plane = (long)side * side;
  const int dy = geom[3 * s], dx = geom[3 * s + 1], flip = geom[3 * s + 2];
  const int sy = y + dy, sx = (flip ? side - 1 - x : x) + dx;
  const unsigned v = (sy >= 0 && sy < side && sx >= 0 && sx < side)
      ? img[s * 3 * plane + c * plane + (long)sy * side + sx] : 0u;
  return ((float)v / 255.f - mean) / sd;
}

// grid-stride over n = outputs*3*side*side values, block 256. mode 0: output image s is
// image s; 1 (Mixup): own*lam + partner*rest, rounded after each product and the sum as
// the CPU does; 2 (CutMix): the partner's values inside rows y0..y1, columns x0..x1.
// partner[s] is output s's partner among the images (read under modes 1 and 2 only).
// The images are f32, or bf16 (rounded) under mixed precision.
template <class T>
__device__ __forceinline__ void fv_augment(const unsigned char* __restrict__ img, const int* __restrict__ geom,
    const int* __restrict__ partner, T* __restrict__ out, long n, int side, float mean0, float mean1,
    float mean2, float std0, float std1, float std2, int mode, float lam, float rest, int y0, int y1, int x0,
    int x1) {
  const long plane = (long)side * side;
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    const int x = (int)(i % side), y = (int)((i / side) % side), c = (int)((i / plane) % 3);
    const long s = i / (3 * plane);
    const float mean = c == 0 ? mean0 : (c == 1 ? mean1 : mean2);
    const float sd = c == 0 ? std0 : (c == 1 ? std1 : std2);
    const bool boxed = mode == 2 && y >= y0 && y < y1 && x >= x0 && x < x1;
    float v = fv_augment_at(img, geom, boxed ? partner[s] : s, c, y, x, side, mean, sd);
    if (mode == 1) {
      const float p = fv_augment_at(img, geom, partner[s], c, y, x, side, mean, sd);
      v = __fadd_rn(__fmul_rn(v, lam), __fmul_rn(p, rest));
    }
    out[i] = fv_as<T>(v);
  }
}
extern "C" __global__ void augment_u8_f32(const unsigned char* __restrict__ img, const int* __restrict__ geom,
    const int* __restrict__ partner, float* __restrict__ out, long n, int side, float mean0, float mean1,
    float mean2, float std0, float std1, float std2, int mode, float lam, float rest, int y0, int y1, int x0,
    int x1) {
  fv_augment(img, geom, partner, out, n, side, mean0, mean1, mean2, std0, std1, std2, mode, lam, rest, y0, y1,
      x0, x1);
}
extern "C" __global__ void augment_u8_bf16(const unsigned char* __restrict__ img, const int* __restrict__ geom,
    const int* __restrict__ partner, fv_bf16* __restrict__ out, long n, int side, float mean0, float mean1,
    float mean2, float std0, float std1, float std2, int mode, float lam, float rest, int y0, int y1, int x0,
    int x1) {
  fv_augment(img, geom, partner, out, n, side, mean0, mean1, mean2, std0, std1, std2, mode, lam, rest, y0, y1,
      x0, x1);
}
