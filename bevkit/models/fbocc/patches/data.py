"""FB-OCC data loading: info paths that follow the data root, and decode errors that name file and sample."""
from __future__ import annotations

import functools
import os

from bevkit.data.decode import naming_sample
from bevkit.data.schema import in_root
from bevkit.models.fbocc.prepare import info_path_fields


def _infos_in_data_root(original):
    """The kit's info files hold paths relative to the data root (absolute ones from older preparations must lie
    inside it): join them with the dataset's data root, else the folder of the info file (the val/test datasets
    of the upstream config have no data_root)."""

    @functools.wraps(original)
    def load_annotations(self, ann_file):
        infos = original(self, ann_file)
        root = self.data_root or os.path.dirname(os.path.abspath(str(self.ann_file)))
        resolve = in_root(root)
        for info in infos:
            for node, key in info_path_fields(info):
                where = resolve(node[key])
                if where is None:  # reached only with --no-data-check: the data check refuses these first
                    raise ValueError(
                        f"{self.ann_file}: sample {info.get('token')} names {node[key]}, outside the data root "
                        f"{root}; run the FB-OCC data preparation on this data root with --force")
                node[key] = where
        return infos

    return load_annotations


def _token(dataset, idx):
    return dataset.data_infos[idx]["token"]


sample_in_data_errors = naming_sample("fbocc", _token)
