// The parts of the bfloat16 pair-layout products that do not depend on the instruction set:
// packing W as [block][k / 2][gate][L][2] and the loops over unit blocks, slices of k and row
// tiles. Included inside each implementation's namespace after kLanes, kTileRows and its
// register tile `tile<R>(p, u, r0, p0, p1, accumulate)` (as kernels_impl.h is).

// Pairs of k per pass over the rows: one slice of a block, [pairs, 4, L, 2], stays in L1.
constexpr int64_t kPairSlice = 32768 / (4 * kLanes * 2 * 2);

void pack_gates(const Matrix& w, uint16_t* out) {
  const int64_t H = w.rows / 4, K = w.cols, pairs = (K + 1) / 2;
  const int64_t blocks = (H + kLanes - 1) / kLanes;
  const uint16_t* src = static_cast<const uint16_t*>(w.data);
  for (int64_t u = 0; u < blocks; ++u) {
    uint16_t* block = out + u * pairs * 4 * kLanes * 2;
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t unit = u * kLanes + l;
        const uint16_t* row = unit < H ? src + (q * H + unit) * w.ld : nullptr;
        uint16_t* column = block + (q * kLanes + l) * 2;
        for (int64_t k = 0; k < 2 * pairs; ++k) {
          column[(k / 2) * 4 * kLanes * 2 + k % 2] = row && k < K ? row[k] : uint16_t(0);
        }
      }
    }
  }
}

template <int R>
inline __attribute__((always_inline)) void tile_rows(const GatesProduct<uint16_t, float>& p,
                                                     int64_t u, int64_t r0, int64_t rows,
                                                     int64_t p0, int64_t p1, bool accumulate) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(p, u, r0, rows, p0, p1, accumulate);
  }
  tile<R>(p, u, r0, p0, p1, accumulate);
}

void gates_product(const GatesProduct<uint16_t, float>& p, int64_t u0, int64_t u1) {
  const int64_t pairs = (p.k + 1) / 2;
  const int64_t slice = p.rows > kTileRows ? kPairSlice : (pairs > 0 ? pairs : 1);
  for (int64_t u = u0; u < u1; ++u) {
    if (pairs == 0) {
      for (int64_t r0 = 0; !p.accumulate && r0 < p.rows; r0 += kTileRows) {
        const int64_t rows = p.rows - r0 < kTileRows ? p.rows - r0 : kTileRows;
        tile_rows<kTileRows>(p, u, r0, rows, 0, 0, false);  // stores zeros
      }
      continue;
    }
    for (int64_t p0 = 0; p0 < pairs; p0 += slice) {
      const int64_t p1 = p0 + slice < pairs ? p0 + slice : pairs;
      for (int64_t r0 = 0; r0 < p.rows; r0 += kTileRows) {
        const int64_t rows = p.rows - r0 < kTileRows ? p.rows - r0 : kTileRows;
        tile_rows<kTileRows>(p, u, r0, rows, p0, p1, p.accumulate || p0 > 0);
      }
    }
  }
}
