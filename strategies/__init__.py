"""The cloud: Flower strategies that train centrally and serve sub-models."""
