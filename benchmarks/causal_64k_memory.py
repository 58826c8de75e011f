# Exact causal attention at N = 65536, forward + backward, through the tiled backend: time and the
# process's peak memory (the target is < 4 GiB). Run: python benchmarks/causal_64k_memory.py
import resource, time, torch, attnkit
torch.set_num_threads(1)
N = 65536
q, k, v = (torch.randn(1, 8, N, 64, requires_grad=True) for _ in range(3))
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * resource.getpagesize()
t = time.perf_counter()
out = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), backend="tiled")
t_fwd = time.perf_counter() - t
out.backward(torch.ones_like(out))
t_all = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
flops = 4 * 8 * (N * (N + 1) // 2) * 64 * 3.5
print(f"causal N={N} fwd {t_fwd:.1f}s fwd+bwd {t_all:.1f}s  {flops / t_all / 1e9:.1f} GFLOP/s  "
      f"peak process RSS {peak / 2**30:.2f} GiB (growth over inputs {(peak - base) / 2**30:.2f} GiB)")
