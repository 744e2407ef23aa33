"""YAML recipes for ``python -m pruner fit --config ...`` (installed as ``pruner.configs``)."""
