"""CIFAR ResNets of He et al. (2015), trained with Ray Train and swept with Ray Tune."""
