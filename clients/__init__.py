"""The devices: the Flower ClientApp that simulates a shard of phones."""
