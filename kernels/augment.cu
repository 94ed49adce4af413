// Augmentation on the device: the loader sends raw u8 pixels (a quarter of the bytes of
// f32 images) with each sample's crop offset and flip; this kernel crops (as a shift of
// a zero-padded image), mirrors and normalises, exactly as the CPU path
// (transforms.rs: shift, hflip, normalize_into) does. Images are square, `side` pixels
// a side (the batch's geometry; 32 for CIFAR-10).
#include "common.cuh"

// grid-stride over n = b*3*side*side outputs, block 256. geom holds (dy, dx, flip) per
// sample. The images are f32, or bf16 (rounded) under mixed precision.
template <class T>
__device__ __forceinline__ void fv_augment(const unsigned char* __restrict__ img, const int* __restrict__ geom,
    T* __restrict__ out, long n, int side, float mean0, float mean1, float mean2, float std0, float std1,
    float std2) {
  const long plane = (long)side * side;
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    const int x = (int)(i % side), y = (int)((i / side) % side), c = (int)((i / plane) % 3);
    const long s = i / (3 * plane);
    const int dy = geom[3 * s], dx = geom[3 * s + 1], flip = geom[3 * s + 2];
    const int sy = y + dy, sx = (flip ? side - 1 - x : x) + dx;
    const unsigned v = (sy >= 0 && sy < side && sx >= 0 && sx < side)
        ? img[s * 3 * plane + c * plane + (long)sy * side + sx] : 0u;
    const float mean = c == 0 ? mean0 : (c == 1 ? mean1 : mean2);
    const float sd = c == 0 ? std0 : (c == 1 ? std1 : std2);
    out[i] = fv_as<T>(((float)v / 255.f - mean) / sd);
  }
}
extern "C" __global__ void augment_u8_f32(const unsigned char* __restrict__ img, const int* __restrict__ geom,
    float* __restrict__ out, long n, int side, float mean0, float mean1, float mean2, float std0, float std1,
    float std2) {
  fv_augment(img, geom, out, n, side, mean0, mean1, mean2, std0, std1, std2);
}
extern "C" __global__ void augment_u8_bf16(const unsigned char* __restrict__ img, const int* __restrict__ geom,
    fv_bf16* __restrict__ out, long n, int side, float mean0, float mean1, float mean2, float std0, float std1,
    float std2) {
  fv_augment(img, geom, out, n, side, mean0, mean1, mean2, std0, std1, std2);
}
