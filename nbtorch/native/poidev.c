/* Poisson deviates for a whole array of means, bit-identical to nbtorch.rng.Ran1.poidev_many (spec section 6).
 *
 * A direct C translation of the Python reference in nbtorch/rng.py (Ran1.uniform / gasdev / gammln / poidev /
 * _poidev_reject / poidev_many).  Every Python ``f32(expr)`` is a ``(float)`` cast of the same double expression,
 * evaluated in the same order with double-precision libm calls, so the results match to the last bit.  It must be
 * compiled WITHOUT -ffast-math and with -ffp-contract=off (no fused multiply-add), see nbtorch/native/__init__.py.
 *
 * Preconditions (checked by the Python caller, Ran1._native_ready): 0 < idum < 2^31 - 1 (the shuffle table has been
 * initialised), 0 <= iy < 2^31 - 1 and 0 <= iv[j] < 2^31 - 1.  This is the state in which the Python _draw_ints
 * takes its ordinary branch; the special seeds -(2^31 - 1) and -2^31 can leave other states, handled in Python.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float expressions must be evaluated in float (FLT_EVAL_METHOD 0); nbtorch falls back to Python"
#endif

#define NB_IA 16807
#define NB_IM 2147483647LL
#define NB_NTAB 32
#define NB_AM (1.0 / 2147483647.0)
#define NB_RNMX (1.0 - 1.2e-7)
#define NB_PI 3.141592653589793

/* Generator state; the layout mirrors the ctypes.Structure NativeState in nbtorch/native/__init__.py. */
typedef struct {
    int64_t idum;          /* Park-Miller value */
    int64_t iy;            /* last shuffled output */
    int64_t iv[NB_NTAB];   /* Bays-Durham shuffle table */
    int64_t iset;          /* gasdev: 1 if gset holds a spare deviate */
    double gset;           /* gasdev spare (a float32 value) */
    double oldm, g, sq, alxm; /* poidev rejection cache (float32 values) */
    const double *buf;     /* uniforms drawn ahead of time by the Python code, handed out first */
    int64_t nbuf;          /* number of entries in buf */
    int64_t bpos;          /* next unused entry of buf (updated) */
} nb_state;

#if defined(__GNUC__)
#define NB_INLINE static inline __attribute__((always_inline))
#else
#define NB_INLINE static inline
#endif

/* ran1 step on (idum, iy, iv): one float32 uniform in (0, 1).  (IA * idum) mod IM equals Schrage's step for
 * 0 < idum < IM; with IM = 2^31 - 1, p mod IM is the sum of the high and low 31-bit parts of p = IA * idum < 2^46,
 * less IM once if that reaches IM (the result is never 0). */
NB_INLINE float nb_ran1(int64_t *idum, int64_t *iy, int64_t *iv)
{
    int64_t p = *idum * NB_IA;
    int64_t next = (p & NB_IM) + (p >> 31);
    if (next >= NB_IM)
        next -= NB_IM;
    int64_t j = (int64_t)((uint64_t)*iy >> 26); /* iy / NDIV for 0 <= iy < IM (NDIV = 2^26) */
    *iy = iv[j];
    iv[j] = next;
    *idum = next;
    float u = (float)(NB_AM * (double)*iy);
    if ((double)u > NB_RNMX)
        u = (float)NB_RNMX;
    return u;
}

/* ran1 as the Python Ran1.uniform: pending buffered uniforms first, then the generator. */
NB_INLINE float nb_uniform(nb_state *st)
{
    if (st->bpos < st->nbuf)
        return (float)st->buf[st->bpos++];
    return nb_ran1(&st->idum, &st->iy, st->iv);
}

/* Small-mean branch (xm < 12): number of uniforms whose running float32 product first drops to <= g.  Products of
 * two floats are exact in double, so float * float is Python's f32(t * u). */
static int64_t nb_small(nb_state *st, float g)
{
    float t = 1.0f;
    int64_t k = 0;
    if (st->bpos < st->nbuf) { /* rare: buffered uniforms pending */
        do {
            t = t * nb_uniform(st);
            k++;
        } while (t > g);
        return k;
    }
    int64_t idum = st->idum, iy = st->iy; /* locals, kept in registers */
    do {
        t = t * nb_ran1(&idum, &iy, st->iv);
        k++;
    } while (t > g);
    st->idum = idum;
    st->iy = iy;
    return k;
}

/* Polar Box-Muller normal deviate with one cached spare. */
static float nb_gasdev(nb_state *st)
{
    if (st->iset) {
        st->iset = 0;
        return (float)st->gset;
    }
    float v1, v2, rsq;
    for (;;) {
        v1 = (float)(2.0 * (double)nb_uniform(st) - 1.0);
        v2 = (float)(2.0 * (double)nb_uniform(st) - 1.0);
        rsq = (float)((double)(float)((double)v1 * v1) + (double)(float)((double)v2 * v2));
        if (!(rsq >= 1.0f || rsq == 0.0f))
            break;
    }
    float fac = (float)sqrt(-2.0 * log((double)rsq) / (double)rsq);
    st->gset = (double)(float)((double)v1 * fac);
    st->iset = 1;
    return (float)((double)v2 * fac);
}

/* ln Gamma(xx): argument rounded to float, Lanczos series in double, result rounded to float. */
static float nb_gammln(double xx)
{
    static const double cof[6] = {76.18009172947146, -86.50532032941677, 24.01409824083091,
                                  -1.231739572450155, 0.1208650973866179e-2, -0.5395239384953e-5};
    double x = (double)(float)xx;
    double y = x;
    double tmp = x + 5.5;
    tmp -= (x + 0.5) * log(tmp);
    double ser = 1.000000000190015;
    for (int j = 0; j < 6; j++) {
        y += 1.0;
        ser += cof[j] / y;
    }
    return (float)(-tmp + log(2.5066282746310005 * ser / x));
}

/* Rejection branch for 12 <= xm <= 1e6 (and NaN), with the (oldm, sq, alxm, g) cache in the state. */
static float nb_poidev_reject(nb_state *st, float xm)
{
    if ((double)xm != st->oldm) {
        st->oldm = (double)xm;
        st->sq = (double)(float)sqrt(2.0 * (double)xm);
        st->alxm = (double)(float)log((double)xm);
        st->g = (double)(float)((double)(float)((double)xm * st->alxm) - (double)nb_gammln((double)xm + 1.0));
    }
    const double sq = st->sq, alxm = st->alxm, g = st->g;
    for (;;) {
        float y, em;
        for (;;) {
            y = (float)tan(NB_PI * (double)nb_uniform(st));
            em = (float)((double)(float)(sq * (double)y) + (double)xm);
            if (!(em < 0.0f))
                break;
        }
        em = (float)floor((double)em); /* NaN stays NaN */
        double e = exp((double)(float)((double)(float)((double)(float)((double)em * alxm)
                                                        - (double)nb_gammln((double)em + 1.0)) - g));
        float t = (float)(0.9 * (1.0 + (double)(float)((double)y * y)) * e);
        if (!((double)nb_uniform(st) > (double)t))
            return em;
    }
}

/* Poisson deviates out[i] for means[i], i = 0..n-1, in order, updating the state.  Returns 0.
 * The small-mean cache (oldm, g) is local, as in the Python poidev_many, and written to the state only when the
 * last mean takes the small-mean branch. */
int64_t nb_poidev_many(nb_state *st, const float *means, float *out, int64_t n)
{
    double s_oldm = 0.0;
    float s_g = 0.0f;
    int have_small = 0;
    for (int64_t i = 0; i < n; i++) {
        float xm = means[i];
        if (xm < 12.0f) {
            if (!have_small || (double)xm != s_oldm) {
                have_small = 1;
                s_oldm = (double)xm;
                s_g = (float)exp(-(double)xm); /* overflow -> inf, as C and rng._exp */
            }
            out[i] = (float)(nb_small(st, s_g) - 1);
        } else if (xm > 1.0e6f) {
            out[i] = (float)((double)xm + sqrt((double)xm) * (double)nb_gasdev(st));
        } else {
            out[i] = nb_poidev_reject(st, xm);
        }
    }
    if (n > 0 && means[n - 1] < 12.0f) {
        st->oldm = s_oldm;
        st->g = (double)s_g;
    }
    return 0;
}
