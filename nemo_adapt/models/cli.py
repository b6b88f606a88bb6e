"""`nemo-adapt models`: the registered architectures."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered model architectures")
    p.set_defaults(func=run)


def run(args) -> int:
    from nemo_adapt.models.spec import list_models

    print(f"{'name':<14} {'params':>9} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3}  description")
    for name, s in list_models().items():
        n = s.num_parameters()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        print(f"{name:<14} {size:>9} {s.num_layers:>6} {s.hidden_size:>6} {s.num_attention_heads:>5} "
              f"{s.num_query_groups:>3}  {s.description}")
    return 0
