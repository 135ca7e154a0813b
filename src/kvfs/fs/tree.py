"""The static shape of a volume: which names exist, before anything is fetched.

The tree is built once from the MountConfig. Names never change while mounted; what a file
*name* points to (which version's bytes) is decided by the resolver at lookup time. Building the
tree needs no network, so listing the root or an alias folder fetches nothing; only a history
folder's names depend on Key Vault (which versions exist).

Node kinds:
- `DirNode`: the root, alias sub-folders, and `..data` (a second view of the root's children,
  as upstream's AtomicWriter layout offers).
- `FileNode`: one object's file (suffix "") or its split `.crt` / `.key` companion.
- `HistoryNode`: an `objectVersionHistory` folder whose children `0`..`N-1` are resolved lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvfs.config.model import MountConfig, ObjectSpec

ROOT_INODE = 1  # the FUSE protocol's root node id
DATA_DIR_NAME = "..data"


@dataclass(eq=False)
class DirNode:
    inode: int
    children: dict[str, Node] = field(default_factory=dict)


@dataclass(eq=False)
class FileNode:
    spec: ObjectSpec
    suffix: str  # "" for the object's own file, ".crt" / ".key" for split companions


@dataclass(eq=False)
class HistoryNode:
    inode: int
    spec: ObjectSpec


Node = DirNode | FileNode | HistoryNode


@dataclass
class Tree:
    """Directories by inode, plus where each object's names live (for invalidation)."""

    root: DirNode
    dirs: dict[int, DirNode | HistoryNode]
    # Every (parent inode, name) at which a spec's files appear, so rotation can invalidate them.
    locations: dict[ObjectSpec, list[tuple[int, str, Node]]]


def build_tree(config: MountConfig) -> Tree:
    """Lay out every configured object; aliases with `/` create sub-folders."""
    next_inode = ROOT_INODE + 1
    root = DirNode(ROOT_INODE)
    dirs: dict[int, DirNode | HistoryNode] = {ROOT_INODE: root}
    placed: list[tuple[DirNode, str, Node, ObjectSpec]] = []

    def new_inode() -> int:
        nonlocal next_inode
        next_inode += 1
        return next_inode - 1

    def folder(parts: list[str]) -> DirNode:
        node = root
        for part in parts:
            child = node.children.get(part)
            if child is None:
                child = DirNode(new_inode())
                node.children[part] = child
                dirs[child.inode] = child
            if not isinstance(child, DirNode):
                # Validation refuses such clashes; this guards against a bypassed validator.
                raise ValueError(f"{'/'.join(parts)} is both a file and a folder")
            node = child
        return node

    for spec in config.objects:
        *parents, leaf = spec.file_name.split("/")
        parent = folder(parents)
        if spec.version_history >= 2:
            history = HistoryNode(new_inode(), spec)
            dirs[history.inode] = history
            parent.children[leaf] = history
            placed.append((parent, leaf, history, spec))
            continue
        main = FileNode(spec, "")
        parent.children[leaf] = main
        placed.append((parent, leaf, main, spec))
        if config.split_cert_key and spec.type == "secret":
            for suffix in (".crt", ".key"):
                companion = FileNode(spec, suffix)
                parent.children[leaf + suffix] = companion
                placed.append((parent, leaf + suffix, companion, spec))

    # `..data` shares the root's children (same nodes, hence the same inodes).
    data_dir = DirNode(new_inode(), dict(root.children))
    dirs[data_dir.inode] = data_dir
    root.children[DATA_DIR_NAME] = data_dir

    locations: dict[ObjectSpec, list[tuple[int, str, Node]]] = {}
    for parent, name, node, spec in placed:
        spots = locations.setdefault(spec, [])
        spots.append((parent.inode, name, node))
        if parent is root:
            spots.append((data_dir.inode, name, node))
    return Tree(root=root, dirs=dirs, locations=locations)
