"""Plugin planting a gather bug in the worker that imports it: the Megatron side's gather keeps each EP rank's
LOCAL expert ids instead of renumbering them to global ones (harness.convert.dist.global_expert_id returns
the local id), as a sync that forgets the EP offset would. At EP 2 expert i of rank 1 lands on expert i of
rank 0: the train step's gradients and weights must not come back as a model."""
from harness.convert import dist

dist.global_expert_id = lambda local_id, ep_rank, layout: local_id
