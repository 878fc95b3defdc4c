"""Names and formats shared by the synthetic-data generator and the data validator.

Facts about the nuScenes / Occ3D / info-pickle formats (see README "Data"); no upstream code.
"""
from __future__ import annotations

#: The 13 tables nuscenes-devkit's NuScenes class loads from a version folder.
TABLES = ('category', 'attribute', 'visibility', 'instance', 'sensor', 'calibrated_sensor',
          'ego_pose', 'log', 'scene', 'sample', 'sample_data', 'sample_annotation', 'map')

#: Required fields per table (what the devkit, the converters and the detection eval read).
TABLE_FIELDS = {
    'category': ('token', 'name', 'description'),
    'attribute': ('token', 'name', 'description'),
    'visibility': ('token', 'level', 'description'),
    'instance': ('token', 'category_token', 'nbr_annotations', 'first_annotation_token',
                 'last_annotation_token'),
    'sensor': ('token', 'channel', 'modality'),
    'calibrated_sensor': ('token', 'sensor_token', 'translation', 'rotation', 'camera_intrinsic'),
    'ego_pose': ('token', 'timestamp', 'translation', 'rotation'),
    'log': ('token', 'logfile', 'vehicle', 'date_captured', 'location'),
    'scene': ('token', 'log_token', 'nbr_samples', 'first_sample_token', 'last_sample_token',
              'name', 'description'),
    'sample': ('token', 'timestamp', 'scene_token', 'prev', 'next'),
    'sample_data': ('token', 'sample_token', 'ego_pose_token', 'calibrated_sensor_token',
                    'timestamp', 'fileformat', 'is_key_frame', 'height', 'width', 'filename',
                    'prev', 'next'),
    'sample_annotation': ('token', 'sample_token', 'instance_token', 'visibility_token',
                          'attribute_tokens', 'translation', 'size', 'rotation', 'prev', 'next',
                          'num_lidar_pts', 'num_radar_pts'),
    'map': ('token', 'log_tokens', 'category', 'filename'),
}

TRAINVAL = 'v1.0-trainval'
TEST = 'v1.0-test'

#: Camera channels in the order of FB-OCC's converter (the BEVDepth order differs; order is not data).
CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT')
LIDAR = 'LIDAR_TOP'

#: Detection classes of the nuScenes detection benchmark (FB-OCC ann_infos label order).
DET_CLASSES = ('car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier', 'motorcycle',
               'bicycle', 'pedestrian', 'traffic_cone')

#: nuScenes general category used for each detection class when generating.
DET_CATEGORY = {
    'car': 'vehicle.car', 'truck': 'vehicle.truck', 'construction_vehicle': 'vehicle.construction',
    'bus': 'vehicle.bus.rigid', 'trailer': 'vehicle.trailer', 'barrier': 'movable_object.barrier',
    'motorcycle': 'vehicle.motorcycle', 'bicycle': 'vehicle.bicycle',
    'pedestrian': 'human.pedestrian.adult', 'traffic_cone': 'movable_object.trafficcone',
}

#: The 23 nuScenes categories (name, short description).
CATEGORIES = (
    ('human.pedestrian.adult', 'Adult subcategory.'),
    ('human.pedestrian.child', 'Child subcategory.'),
    ('human.pedestrian.wheelchair', 'Wheelchairs.'),
    ('human.pedestrian.stroller', 'Strollers.'),
    ('human.pedestrian.personal_mobility', 'Small electric or self-propelled vehicles.'),
    ('human.pedestrian.police_officer', 'Police officer.'),
    ('human.pedestrian.construction_worker', 'Construction worker.'),
    ('animal', 'All animals.'),
    ('vehicle.car', 'Vehicle designed primarily for personal use.'),
    ('vehicle.motorcycle', 'Gasoline or electric powered 2-wheeled vehicle.'),
    ('vehicle.bicycle', 'Human or electric powered 2-wheeled vehicle.'),
    ('vehicle.bus.bendy', 'Bendy bus subcategory.'),
    ('vehicle.bus.rigid', 'Rigid bus subcategory.'),
    ('vehicle.truck', 'Vehicles primarily designed to haul cargo.'),
    ('vehicle.construction', 'Vehicles primarily designed for construction.'),
    ('vehicle.emergency.ambulance', 'All types of ambulances.'),
    ('vehicle.emergency.police', 'All types of police vehicles.'),
    ('vehicle.trailer', 'Any vehicle trailer.'),
    ('movable_object.barrier', 'Temporary road barrier.'),
    ('movable_object.trafficcone', 'All types of traffic cone.'),
    ('movable_object.pushable_pullable', 'Objects that a pedestrian may push or pull.'),
    ('movable_object.debris', 'Movable object that is left on the driveable surface.'),
    ('static_object.bicycle_rack', 'Area or device intended to park or secure bicycles.'),
)

ATTRIBUTES = (
    ('vehicle.moving', 'Vehicle is moving.'),
    ('vehicle.stopped', 'Vehicle, with a driver/rider in/on it, is currently stationary.'),
    ('vehicle.parked', 'Vehicle is stationary and there is no driver/rider in/on it.'),
    ('cycle.with_rider', 'There is someone riding the bicycle or motorcycle.'),
    ('cycle.without_rider', 'There is no one on the bicycle or motorcycle.'),
    ('pedestrian.sitting_lying_down', 'The human is sitting or lying down.'),
    ('pedestrian.standing', 'The human is standing.'),
    ('pedestrian.moving', 'The human is moving.'),
)

#: Visibility bins (token, level): fraction of the object visible in the 6 images.
VISIBILITIES = (('1', 'v0-40'), ('2', 'v40-60'), ('3', 'v60-80'), ('4', 'v80-100'))

# ---- Occ3D-nuScenes ------------------------------------------------------------------------
OCC3D_CLASSES = ('others', 'barrier', 'bicycle', 'bus', 'car', 'construction_vehicle',
                 'motorcycle', 'pedestrian', 'traffic_cone', 'trailer', 'truck',
                 'driveable_surface', 'other_flat', 'sidewalk', 'terrain', 'manmade',
                 'vegetation', 'free')
OCC_FREE = 17
OCC_ID = {name: i for i, name in enumerate(OCC3D_CLASSES)}
OCC_SHAPE = (200, 200, 16)
OCC_VOXEL = 0.4
OCC_RANGE = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)
OCC_KEYS = ('semantics', 'mask_lidar', 'mask_camera')

# ---- info pickles written by the models' data preparation ------------------------------------
#: FB-OCC (FB-BEV tools/create_data_bevdet.py): {'infos': [...], 'metadata': {'version': ...}}.
FBOCC_INFO_FILES = ('bevdetv2-nuscenes_infos_train.pkl', 'bevdetv2-nuscenes_infos_val.pkl')
FBOCC_INFO_KEYS = ('lidar_path', 'token', 'sweeps', 'cams', 'lidar2ego_translation',
                   'lidar2ego_rotation', 'ego2global_translation', 'ego2global_rotation',
                   'timestamp', 'gt_boxes', 'gt_names', 'gt_velocity', 'num_lidar_pts',
                   'num_radar_pts', 'valid_flag', 'ann_infos', 'scene_token', 'scene_name',
                   'prev', 'occ_path')
FBOCC_CAM_KEYS = ('data_path', 'type', 'sample_data_token', 'sensor2ego_translation',
                  'sensor2ego_rotation', 'ego2global_translation', 'ego2global_rotation',
                  'timestamp', 'sensor2lidar_rotation', 'sensor2lidar_translation',
                  'cam_intrinsic')
#: BEVDepth (scripts/gen_info.py): a plain list of dicts.
BEVDEPTH_INFO_FILES = ('nuscenes_infos_train.pkl', 'nuscenes_infos_val.pkl')
BEVDEPTH_INFO_KEYS = ('sample_token', 'timestamp', 'scene_token', 'cam_infos', 'lidar_infos',
                      'cam_sweeps', 'lidar_sweeps', 'ann_infos')
BEVDEPTH_CAM_KEYS = ('sample_token', 'ego_pose', 'timestamp', 'is_key_frame', 'height', 'width',
                     'filename', 'calibrated_sensor')
BEVDEPTH_ANN_KEYS = ('category_name', 'num_lidar_pts', 'num_radar_pts', 'translation', 'size',
                     'rotation', 'velocity')


# ---- paths inside info files ---------------------------------------------------------------------------
def in_root(root):
    """``resolve(stored)`` for one data root: where a path stored in an info file points. A relative path is
    relative to the data root (what the kit's data preparation writes, so a copied or moved root keeps working);
    an absolute one must lie inside the root (as given or with its symlinks resolved). None when it points
    outside the root. The root is resolved once (info files hold hundreds of thousands of paths)."""
    import os

    base = os.path.normpath(os.path.abspath(str(root)))
    prefixes = tuple({b.rstrip(os.sep) + os.sep for b in (base, os.path.realpath(base))})

    def resolve(stored):
        target = os.path.normpath(os.path.join(base, str(stored)))  # an absolute stored path replaces the base
        return target if target.startswith(prefixes) else None

    return resolve

