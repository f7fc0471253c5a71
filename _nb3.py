import math, torch, torch.distributed as dist, gg_notebook as gg, time
HEADS = 4
def attention(x, wq, wk, wv, wo):
    B, S, H = x.shape
    D = H // HEADS
    q = (x @ wq).view(B, S, HEADS, D).transpose(1, 2)
    k = (x @ wk).view(B, S, HEADS, D).transpose(1, 2)
    v = (x @ wv).view(B, S, HEADS, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    probs = torch.softmax(scores, dim=-1)
    ctx = (probs @ v).transpose(1, 2).reshape(B, S, H)
    return ctx @ wo

def attention_tp(x, wq, wk, wv, wo, fixed=False):
    B, S, _ = x.shape
    heads = HEADS // dist.get_world_size()
    D = wq.shape[1] // heads
    q = (x @ wq).view(B, S, heads, D).transpose(1, 2)
    k = (x @ wk).view(B, S, heads, D).transpose(1, 2)
    v = (x @ wv).view(B, S, heads, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    probs = torch.softmax(scores, dim=-1 if fixed else 2)
    ctx = (probs @ v).transpose(1, 2).reshape(B, S, heads * D)
    out = ctx @ wo
    dist.all_reduce(out)
    return out

def make_problem(fixed):
    g = torch.Generator().manual_seed(0)
    B, S, H = 2, 8, 16
    x = torch.randn(B, S, H, dtype=torch.float64, generator=g)
    ws = [torch.randn(H, H, dtype=torch.float64, generator=g) * H ** -0.5 for _ in range(4)]
    import functools
    return gg.Problem(sequential=attention, distributed=functools.partial(attention_tp, fixed=fixed), inputs=[x, *ws],
        placements=[gg.Replicate(), gg.Shard(1), gg.Shard(1), gg.Shard(1), gg.Shard(0)], world_size=2,
        expect=[gg.Replicate()], name="attention_tp" + ("" if fixed else "[softmax dim]"))
t=time.time()
s = gg.ProofSession(make_problem(False)); w = s.widget(); w.run_button.click()
print(time.time()-t)
import re
print(w.verdict())
print(re.sub("<[^>]+>"," ",w.current_html.value)[:3000])
print([ (x.text, x.evidence) for x in s.suggestions()])
s2 = gg.ProofSession(make_problem(True)); w2 = s2.widget(); w2.run_button.click(); print(w2.verdict())
print(time.time()-t)
