"""Squares of 0..N-1, summed on the engines: the toy package's workload."""


def add_arguments(parser) -> None:
    parser.add_argument("--count", type=int, default=100, help="how many squares")


def run(cluster, args) -> dict:
    return {"sum": sum(cluster.map(lambda x: x * x, range(args.count)))}


def summary(figures: dict) -> str:
    return f"sum of squares: {figures['sum']}"
