/*
 * Whole-page copies by index, for the primary agent's stopped window
 * (kemari_suite.checkpoint.pagecopy). Loaded with ctypes, which releases the GIL
 * for the call, so two halves of one staging run on two threads at once.
 *
 * numpy's take() of 4096-byte rows copies them in small pieces; one memcpy per page
 * staged 4000 scattered pages about three times faster on the development machines.
 * The caller checks every index against the page count before the call.
 */
#include <stdint.h>
#include <string.h>

/* dst[i] = src[idx[i]] for i < k; rows of `page` bytes. */
void kemari_gather(uint8_t *dst, const uint8_t *src, const int64_t *idx, int64_t k, int64_t page)
{
    for (int64_t i = 0; i < k; i++)
        memcpy(dst + i * page, src + idx[i] * page, (size_t)page);
}

/* dst[idx[i]] = src[i] for i < k; rows of `page` bytes. */
void kemari_scatter(uint8_t *dst, const uint8_t *src, const int64_t *idx, int64_t k, int64_t page)
{
    for (int64_t i = 0; i < k; i++)
        memcpy(dst + idx[i] * page, src + i * page, (size_t)page);
}
