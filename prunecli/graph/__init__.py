"""Dependency graph: groups of coupled channels found from the traced computation."""

from prunecli.graph.build import DependencyGraph, build_graph, model_fingerprint
from prunecli.graph.groups import AttentionSite, Group, Member

__all__ = ["AttentionSite", "DependencyGraph", "Group", "Member", "build_graph", "model_fingerprint"]
