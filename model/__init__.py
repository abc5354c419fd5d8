"""Networks and differentiable pieces of the tracker."""
