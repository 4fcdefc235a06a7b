"""Parameter shapes of the benchmark scenarios."""


def gpt2_small():
    """The 148 parameter tensors of GPT-2 small (124M parameters)."""
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def many_small(count=3000, numel=4096):
    return [(numel,)] * count
