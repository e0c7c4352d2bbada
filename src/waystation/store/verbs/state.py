"""Verbs of the Vagrant state a client keeps on the server: bases, projects, targets, boxes."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import boxes, resources
from waystation.store.verbs.base import Pending, Verbs


class StateVerbs(Verbs):
    # -- basis -----------------------------------------------------------------

    def basis_upsert(self, basis: vs.Basis) -> Pending[vs.Basis]:
        """Create or update a basis (by name or path)."""
        return self._db.write(resources.basis_upsert, basis)

    def basis_get(self, ref: sdk.Ref.Basis) -> Pending[vs.Basis]:
        """One basis (NotFound)."""
        return self._db.read(resources.basis_get, ref)

    def basis_find(self, basis: vs.Basis) -> Pending[vs.Basis]:
        """The basis matching the given fields (NotFound)."""
        return self._db.read(resources.basis_find, basis)

    def basis_list(self) -> Pending[list[sdk.Ref.Basis]]:
        """Every basis."""
        return self._db.read(resources.basis_list)

    def basis_delete(self, ref: sdk.Ref.Basis) -> Pending[bool]:
        """Delete a basis; whether it existed."""
        return self._db.write(resources.basis_delete, ref)

    # -- project ---------------------------------------------------------------

    def project_upsert(self, project: vs.Project) -> Pending[vs.Project]:
        """Create or update a project of a basis."""
        return self._db.write(resources.project_upsert, project)

    def project_get(self, ref: sdk.Ref.Project) -> Pending[vs.Project]:
        """One project (NotFound)."""
        return self._db.read(resources.project_get, ref)

    def project_find(self, project: vs.Project) -> Pending[vs.Project]:
        """The project matching the given fields (NotFound)."""
        return self._db.read(resources.project_find, project)

    def project_list(self) -> Pending[list[sdk.Ref.Project]]:
        """Every project."""
        return self._db.read(resources.project_list)

    def project_delete(self, ref: sdk.Ref.Project) -> Pending[bool]:
        """Delete a project; whether it existed."""
        return self._db.write(resources.project_delete, ref)

    # -- target ----------------------------------------------------------------

    def target_upsert(self, project: sdk.Ref.Project, target: vs.Target) -> Pending[vs.Target]:
        """Create or update a target (machine) of a project."""
        return self._db.write(resources.target_upsert, project, target)

    def target_get(self, project: sdk.Ref.Project, ref: sdk.Ref.Target) -> Pending[vs.Target]:
        """One target (NotFound)."""
        return self._db.read(resources.target_get, project, ref)

    def target_find(self, target: vs.Target) -> Pending[vs.Target]:
        """The target matching the given fields (NotFound)."""
        return self._db.read(resources.target_find, target)

    def target_list(self) -> Pending[list[sdk.Ref.Target]]:
        """Every target."""
        return self._db.read(resources.target_list)

    def target_delete(self, project: sdk.Ref.Project, ref: sdk.Ref.Target) -> Pending[bool]:
        """Delete a target; whether it existed."""
        return self._db.write(resources.target_delete, project, ref)

    # -- box -------------------------------------------------------------------

    def box_upsert(self, box: vs.Box) -> Pending[vs.Box]:
        """Create or update a box version, stamped now."""
        now = Timestamp()
        now.GetCurrentTime()
        return self._db.write(boxes.box_upsert, box, now)

    def box_get(self, ref: sdk.Ref.Box) -> Pending[vs.Box]:
        """One box (NotFound)."""
        return self._db.read(boxes.box_get, ref)

    def box_find(self, ref: sdk.Ref.Box) -> Pending[vs.Box | None]:
        """The newest box version matching a constraint, or None."""
        return self._db.read(boxes.box_find, ref)

    def box_list(self) -> Pending[list[sdk.Ref.Box]]:
        """Every box."""
        return self._db.read(boxes.box_list)

    def box_delete(self, ref: sdk.Ref.Box) -> Pending[bool]:
        """Delete a box; whether it existed."""
        return self._db.write(boxes.box_delete, ref)
