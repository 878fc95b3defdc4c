"""A small procedural 3D street world and the sensors that observe it.

Everything the synthetic dataset contains is derived from one World per scene, so images,
lidar, box annotations and Occ3D voxels agree:

* the ground is the plane z = 0 of the scene's road frame, painted with materials whose Occ3D
  class is driveable_surface / other_flat / sidewalk / terrain (a raster, 0.2 m cells);
* every other thing is a yaw-only box standing on (or floating above) the ground: detection
  objects (annotated, some moving at constant velocity) and static manmade / vegetation /
  others blocks (not annotated);
* cameras are rendered by exact ray casting (ray/plane and ray/box slab tests, z-buffer),
  the lidar casts the same rays, and voxels are filled by exact box/voxel overlap tests.

Coordinates: the road frame ("world") has x along the road, y to the left, z up. Global
nuScenes coordinates are the road frame rotated by ``World.heading`` and shifted by
``World.origin``. The ego frame is x forward, y left, z up, on the ground (nuScenes convention).
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np

from .schema import DET_CLASSES, OCC_ID, OCC_RANGE, OCC_SHAPE, OCC_VOXEL, OCC_FREE

# ---- sensors --------------------------------------------------------------------------------
# Typical nuScenes calibration (one vehicle of the real dataset, rounded): camera position in
# the ego frame [m], rotation camera->ego as quaternion (w, x, y, z), and fx, cx, cy [px] at
# 1600x900. Camera frame: x right, y down, z forward.
CAMERA_CALIB = {
    'CAM_FRONT': ((1.7008, 0.0159, 1.5110), (0.49980, -0.50303, 0.49978, -0.49737),
                  (1266.42, 816.27, 491.51)),
    'CAM_FRONT_RIGHT': ((1.5508, -0.4934, 1.4957), (0.20603, -0.20269, 0.68245, -0.67136),
                        (1260.85, 807.97, 495.33)),
    'CAM_FRONT_LEFT': ((1.5239, 0.4946, 1.5093), (0.67573, -0.67363, 0.21214, -0.21123),
                       (1272.60, 826.62, 479.75)),
    'CAM_BACK': ((0.0283, 0.0035, 1.5791), (0.50379, -0.49740, -0.49419, 0.50455),
                 (809.22, 829.22, 481.78)),
    'CAM_BACK_LEFT': ((1.0357, 0.4848, 1.5910), (0.69242, -0.70316, -0.11648, 0.11203),
                      (1256.74, 792.11, 492.78)),
    'CAM_BACK_RIGHT': ((1.0149, -0.4806, 1.5624), (0.12281, -0.13240, -0.70043, 0.69050),
                       (1259.51, 807.25, 501.20)),
}
#: LIDAR_TOP: position and rotation lidar->ego (x axis points to the ego's right, like nuScenes).
LIDAR_CALIB = ((0.9437, 0.0, 1.8402), (0.70780, -0.00649, 0.01065, -0.70631))
FULL_W, FULL_H = 1600, 900
#: Velodyne HDL-32E-like: 32 rings from -30.67 to +10.67 deg, 0.33 deg azimuth steps.
LIDAR_ELEVATIONS = np.radians(np.linspace(-30.67, 10.67, 32))
LIDAR_AZIMUTHS = 1084
LIDAR_MAX_RANGE = 70.0


def quat_to_mat(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def mat_to_quat(m) -> list:
    """Rotation matrix -> [w, x, y, z] with w >= 0 (Shepperd's method)."""
    m = np.asarray(m, dtype=np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q = q / np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]


def rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _small_rotation(rng, max_deg: float) -> np.ndarray:
    a = np.radians(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(a[0]), -math.sin(a[0])], [0, math.sin(a[0]), math.cos(a[0])]])
    ry = np.array([[math.cos(a[1]), 0, math.sin(a[1])], [0, 1, 0], [-math.sin(a[1]), 0, math.cos(a[1])]])
    return rot_z(a[2]) @ ry @ rx


@dataclass
class Sensor:
    """One calibrated sensor: rotation / translation sensor->ego, intrinsics for cameras."""
    channel: str
    rotation: np.ndarray          # 3x3 sensor -> ego
    translation: np.ndarray       # (3,)
    intrinsic: np.ndarray = None  # 3x3 at (width, height); None for the lidar
    width: int = 0
    height: int = 0


def make_sensors(rng, image_size=(FULL_W, FULL_H)) -> dict:
    """Per-vehicle calibration: the typical values with small mounting perturbations."""
    w, h = image_size
    sensors = {}
    for name, (t, q, (f, cx, cy)) in CAMERA_CALIB.items():
        rot = quat_to_mat(q) @ _small_rotation(rng, 0.3)
        trans = np.array(t) + rng.uniform(-0.01, 0.01, 3)
        f = f * (1 + rng.uniform(-0.003, 0.003))
        k = np.array([[f * w / FULL_W, 0.0, cx * w / FULL_W],
                      [0.0, f * h / FULL_H, cy * h / FULL_H],
                      [0.0, 0.0, 1.0]])
        sensors[name] = Sensor(name, rot, trans, k, w, h)
    t, q = LIDAR_CALIB
    sensors['LIDAR_TOP'] = Sensor('LIDAR_TOP', quat_to_mat(q) @ _small_rotation(rng, 0.2),
                                  np.array(t) + rng.uniform(-0.01, 0.01, 3))
    return sensors


# ---- appearance ------------------------------------------------------------------------------
def _hsv(h, s, v):
    return colorsys.hsv_to_rgb(h / 360.0, s, v)


#: Base colour (RGB 0..1) per Occ3D class: saturated, well separated hues for the detection
#: classes, desaturated ones for surfaces and static things (so classes are told apart by hue).
CLASS_HSV = {
    'bus': (0, .85, .85), 'truck': (28, .85, .9), 'construction_vehicle': (56, .9, .9),
    'pedestrian': (90, .85, .85), 'bicycle': (130, .85, .8), 'motorcycle': (175, .9, .8),
    'car': (215, .85, .9), 'trailer': (250, .8, .85), 'traffic_cone': (285, .8, .9),
    'barrier': (320, .85, .9),
    'others': (45, .3, .6), 'driveable_surface': (220, .05, .38), 'other_flat': (190, .3, .55),
    'sidewalk': (30, .18, .68), 'terrain': (95, .45, .45), 'manmade': (15, .3, .6),
    'vegetation': (150, .55, .35),
}
CLASS_RGB = np.zeros((18, 3), np.float32)
for _name, _hsv_v in CLASS_HSV.items():
    CLASS_RGB[OCC_ID[_name]] = _hsv(*_hsv_v)
SKY_TOP = np.array(_hsv(210, .45, .95), np.float32)
SKY_HORIZON = np.array(_hsv(200, .12, .92), np.float32)

# Ground materials: (Occ3D class, colour).
MAT_TERRAIN, MAT_ASPHALT, MAT_MARKING, MAT_SIDEWALK, MAT_OTHER_FLAT = range(5)
MATERIAL_CLASS = np.array([OCC_ID['terrain'], OCC_ID['driveable_surface'],
                           OCC_ID['driveable_surface'], OCC_ID['sidewalk'],
                           OCC_ID['other_flat']], np.uint8)
MATERIAL_RGB = np.array([CLASS_RGB[OCC_ID['terrain']], CLASS_RGB[OCC_ID['driveable_surface']],
                         _hsv(0, 0, .9), CLASS_RGB[OCC_ID['sidewalk']],
                         CLASS_RGB[OCC_ID['other_flat']]], np.float32)
MATERIAL_INTENSITY = np.array([12, 8, 90, 25, 30], np.float32)

#: Typical sizes (length, width, height) [m] per detection class (nuScenes-like means).
DET_SIZE = {
    'car': (4.6, 1.95, 1.7), 'truck': (7.0, 2.5, 3.0), 'construction_vehicle': (6.5, 2.6, 3.2),
    'bus': (11.0, 2.9, 3.5), 'trailer': (12.0, 2.9, 3.8), 'barrier': (0.5, 2.5, 1.0),
    'motorcycle': (2.1, 0.8, 1.45), 'bicycle': (1.7, 0.6, 1.3), 'pedestrian': (0.73, 0.67, 1.77),
    'traffic_cone': (0.41, 0.41, 1.07),
}

LANES = {'ego': -2.25, 'slow': -5.75, 'oncoming': 2.25, 'oncoming_slow': 5.75}
PARK_Y, SIDEWALK = 8.8, (10.0, 13.6)
WALK_Y = (11.2, 12.2)       # +x walkers on the inner band, -x walkers on the outer band
STAND_Y, POLE_Y = 13.15, 10.5
PARK_MAX_W = 2.6           # parked vehicles must clear the poles and the lanes
TREE_Y, BUILDING_Y = 15.5, 18.0
RASTER_RES = 0.2
#: Scenery (static classes) of a world: 'mixed', scattered trees, plazas and buildings with wide gaps (the default);
#: 'banded', the same classes as continuous bands along the road, wide enough for a coarse occupancy grid: an
#: other_flat verge, a row of boxy 'others' cabinets, hedges and a closed building row. The FB-OCC demo learns
#: those on 2 CPU cores, where scattered thin trees stay below its 0.8 m grid's reach.
SCENERIES = ('mixed', 'banded')
BANDED_VERGE = (SIDEWALK[1], 17.6)      # other_flat verge behind the sidewalk
BANDED_CABINET_Y, BANDED_HEDGE_Y, BANDED_BUILDING_Y = 16.2, 20.0, 24.0


@dataclass
class World:
    """One scene's world; see the module docstring."""
    seed: int
    n_samples: int
    dt: float
    heading: float
    origin: np.ndarray
    ego_speed: float
    ego_wobble: tuple
    sun: np.ndarray
    # ground raster
    raster_x0: float = 0.0
    raster_y0: float = 0.0
    material: np.ndarray = None     # uint8 [nx, ny]
    texture: np.ndarray = None      # float32 [nx, ny] brightness factor
    # objects (N)
    cls: np.ndarray = None          # int Occ3D class
    det: list = field(default_factory=list)     # detection class name or ''
    attr: list = field(default_factory=list)    # nuScenes attribute name or ''
    center: np.ndarray = None       # (N,3) at t = 0
    size: np.ndarray = None         # (N,3) length, width, height
    yaw: np.ndarray = None          # (N,)
    vel: np.ndarray = None          # (N,2)
    tint: np.ndarray = None         # (N,) brightness factor
    shade: np.ndarray = None        # (N,6) brightness of the faces +x,-x,+y,-y,+z,-z

    # -- motion
    def ego_pose(self, t: float):
        """(x, y, yaw) of the ego in the road frame at time t [s]."""
        amp, omega, phase = self.ego_wobble
        x = -10.0 + self.ego_speed * t
        y = LANES['ego'] + amp * math.sin(omega * t + phase)
        yaw = math.atan2(amp * omega * math.cos(omega * t + phase), self.ego_speed)
        return x, y, yaw

    def centers(self, t: float) -> np.ndarray:
        c = self.center.copy()
        c[:, :2] += self.vel * t
        return c

    def to_global(self, xyz) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ rot_z(self.heading).T + np.array([self.origin[0], self.origin[1], 0.0])

    def ground_material(self, x, y):
        """(material id, texture factor) of the ground at road-frame points (x, y)."""
        nx, ny = self.material.shape
        ix = np.floor((np.asarray(x) - self.raster_x0) * (1.0 / RASTER_RES))
        iy = np.floor((np.asarray(y) - self.raster_y0) * (1.0 / RASTER_RES))
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        flat = np.where(inside, ix * ny + iy, 0).astype(np.int64)
        mat = np.where(inside, np.take(self.material.ravel(), flat), np.uint8(MAT_TERRAIN))
        tex = np.where(inside, np.take(self.texture.ravel(), flat), np.float32(1.0))
        return mat, tex


# ---- world construction ----------------------------------------------------------------------
class _Builder:
    def __init__(self, rng):
        self.rng = rng
        self.rows = []

    def add(self, cls_name, center_xy, size, yaw, vel=(0.0, 0.0), det='', attr='', z0=0.0):
        l, w, h = size
        self.rows.append((OCC_ID[cls_name], det, attr, (center_xy[0], center_xy[1], z0 + h / 2),
                          (l, w, h), yaw, vel))

    def det_size(self, name):
        l, w, h = DET_SIZE[name]
        s = self.rng.uniform(0.9, 1.1, 3)
        return l * s[0], w * s[1], h * s[2]


def _fill_track(rng, lo, hi, fixed, make, gap=(4.0, 20.0)):
    """Place objects along a 1-D track [lo, hi] between already placed intervals ``fixed``.

    make() -> (length, payload); returns [(x_center, payload)] of the new objects.
    """
    taken = sorted(fixed)
    out = []
    x = lo + rng.uniform(0, gap[1])
    while x < hi:
        length, payload = make()
        a, b = x, x + length
        clash = [iv for iv in taken if iv[0] < b + 1.0 and iv[1] > a - 1.0]
        if clash:
            x = max(iv[1] for iv in clash) + 1.0 + rng.uniform(*gap) * 0.3
            continue
        out.append(((a + b) / 2, payload))
        taken.append((a, b))
        x = b + rng.uniform(*gap)
    return out


def _banded_scenery(b: '_Builder', side: int, lo: float, hi: float, in_cross) -> None:
    """Static things of the 'banded' scenery on one side of the road (see :data:`SCENERIES`): cabinets ('others')
    on the verge, hedges (vegetation) and a closed building row (manmade), each a near-continuous band along x."""
    rng = b.rng

    def row(y, length, gap, size_of, cls_name, margin=2.0):
        x = lo + rng.uniform(0, gap[1])
        while x < hi:
            seg = rng.uniform(*length)
            if in_cross(x, x + seg, margin):    # slide past the side street: the band resumes right after it
                x += 1.0
                continue
            w, h = size_of()
            b.add(cls_name, (x + seg / 2, side * (y + w / 2)), (seg, w, h), 0.0)
            x += seg + rng.uniform(*gap)

    row(BANDED_CABINET_Y, (1.2, 1.6), (3.0, 6.0), lambda: (1.2, rng.uniform(1.2, 1.6)), 'others')
    row(BANDED_HEDGE_Y, (6.0, 14.0), (1.0, 3.0), lambda: (1.6, rng.uniform(2.0, 3.0)), 'vegetation')
    row(BANDED_BUILDING_Y, (15.0, 35.0), (1.0, 4.0), lambda: (rng.uniform(8, 16), rng.uniform(6, 15)), 'manmade')


def build_world(seed: int, n_samples: int, dt: float = 0.5, scenery: str = 'mixed') -> World:
    """Deterministically build a scene world from ``seed`` (``scenery``: one of :data:`SCENERIES`)."""
    if scenery not in SCENERIES:
        raise ValueError(f"scenery {scenery!r}: expected one of {', '.join(SCENERIES)}")
    rng = np.random.default_rng(seed)
    ego_speed = float(rng.uniform(3.0, 7.0))
    duration = dt * max(n_samples - 1, 0)
    world = World(seed=seed, n_samples=n_samples, dt=dt,
                  heading=float(rng.uniform(-math.pi, math.pi)),
                  origin=np.array([rng.uniform(300, 1800), rng.uniform(300, 1800)]),
                  ego_speed=ego_speed,
                  ego_wobble=(float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.3, 0.8)),
                              float(rng.uniform(0, 2 * math.pi))),
                  sun=None)
    az, el = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(35), math.radians(65))
    world.sun = np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])
    x_ego0 = world.ego_pose(0.0)[0]
    x_ego1 = world.ego_pose(duration)[0]
    lo, hi = x_ego0 - 110.0, x_ego1 + 110.0
    x_cross = float(rng.uniform(x_ego0 + 15, x_ego1 + 45))      # a side street ahead

    def in_cross(a, b, margin=1.0):
        return a < x_cross + 8 + margin and b > x_cross - 8 - margin

    # -- ground raster
    nx = int(math.ceil((hi - lo) / RASTER_RES))
    ny = int(math.ceil(140.0 / RASTER_RES))
    world.raster_x0, world.raster_y0 = lo, -70.0
    xs = lo + (np.arange(nx) + 0.5) * RASTER_RES
    ys = -70.0 + (np.arange(ny) + 0.5) * RASTER_RES
    gx, gy = np.meshgrid(xs, ys, indexing='ij')
    ay = np.abs(gy)
    mat = np.full((nx, ny), MAT_TERRAIN, np.uint8)
    mat[(ay >= SIDEWALK[0]) & (ay < SIDEWALK[1])] = MAT_SIDEWALK
    mat[ay < SIDEWALK[0]] = MAT_ASPHALT
    cross = np.abs(gx - x_cross) < 8.0
    mat[cross & (ay >= SIDEWALK[0])] = MAT_ASPHALT
    # lane markings: dashed lane dividers, solid road edges (still driveable surface)
    dash = (np.floor(gx / 3.0) % 2 == 0)
    for yl in (-4.0, 4.0):
        mat[(np.abs(gy - yl) < 0.1) & dash & ~cross] = MAT_MARKING
    for yl in (-7.5, 7.5):
        mat[(np.abs(gy - yl) < 0.1) & ~cross] = MAT_MARKING
    # median islands (other_flat) with gaps, plazas of other_flat on the terrain
    for x0 in np.arange(lo, hi, 40.0):
        a = x0 + rng.uniform(0, 10)
        b = a + rng.uniform(12, 25)
        mat[(gx >= a) & (gx < b) & (ay < 0.5) & ~cross] = MAT_OTHER_FLAT
    if scenery == 'banded':
        mat[(ay >= BANDED_VERGE[0]) & (ay < BANDED_VERGE[1]) & ~cross] = MAT_OTHER_FLAT
    else:
        for _ in range(int((hi - lo) / 50)):
            cx_, side = rng.uniform(lo, hi), rng.choice([-1, 1])
            sel = (np.abs(gx - cx_) < rng.uniform(3, 8)) & (np.abs(gy - side * 15.5) < 1.8) & ~cross
            mat[sel & (mat == MAT_TERRAIN)] = MAT_OTHER_FLAT
    world.material = mat
    # texture: 0.5 m random checker + gentle large-scale variation, anchored to the ground
    coarse = rng.uniform(0.85, 1.15, (nx // 25 + 2, ny // 25 + 2)).astype(np.float32)
    fine = rng.uniform(0.88, 1.12, (nx // 2 + 1, ny // 2 + 1)).astype(np.float32)
    world.texture = (np.repeat(np.repeat(fine, 2, 0), 2, 1)[:nx, :ny]
                     * np.repeat(np.repeat(coarse, 25, 0), 25, 1)[:nx, :ny])

    b = _Builder(rng)
    mid_t = duration / 2
    x_mid = world.ego_pose(mid_t)[0]

    # -- static world: buildings, trees, poles, others
    for side in (-1, 1):
        if scenery == 'banded':
            _banded_scenery(b, side, lo, hi, in_cross)
        else:
            x = lo
            while x < hi:
                length = rng.uniform(10, 30)
                if not in_cross(x, x + length, 2.0):
                    depth, height = rng.uniform(8, 20), rng.uniform(6, 15)
                    b.add('manmade', (x + length / 2, side * (BUILDING_Y + depth / 2)),
                          (length, depth, height), 0.0)
                x += length + rng.uniform(3, 10)
            x = lo + rng.uniform(0, 8)
            while x < hi:
                if not in_cross(x - 2, x + 2):
                    if rng.uniform() < 0.75:
                        trunk_h = rng.uniform(1.5, 2.5)
                        b.add('vegetation', (x, side * TREE_Y), (0.4, 0.4, trunk_h), 0.0)
                        cw = rng.uniform(2.0, 3.2)
                        b.add('vegetation', (x, side * TREE_Y), (cw, cw, rng.uniform(2, 4)), 0.0,
                              z0=trunk_h)
                    else:
                        b.add('others', (x, side * (TREE_Y - 1.0)), (0.8, 0.8, rng.uniform(0.8, 1.4)),
                              0.0)
                x += rng.uniform(6, 14)
        x = lo + rng.uniform(0, 10)
        while x < hi:
            if not in_cross(x - 1, x + 1):
                b.add('manmade', (x, side * POLE_Y), (0.25, 0.25, rng.uniform(4, 7)), 0.0)
            x += rng.uniform(15, 25)

    # -- moving traffic: each lane moves at one speed, so lane-mates never collide
    lane_speed = {'ego': ego_speed, 'slow': rng.uniform(2.0, 4.0),
                  'oncoming': -rng.uniform(5.0, 9.0), 'oncoming_slow': -rng.uniform(3.0, 6.0)}
    span = (lo - 12 * duration - 20, hi + 12 * duration + 20)

    def vehicle_maker(kinds, probs):
        def make():
            name = str(rng.choice(kinds, p=probs))
            size = b.det_size(name)
            return size[0], (name, size)
        return make

    for lane, y in LANES.items():
        v = float(lane_speed[lane])
        yaw = 0.0 if v > 0 else math.pi
        fixed = []
        guaranteed = []
        if lane == 'ego':   # keep the ego's own stretch of lane free
            fixed.append((x_ego0 - 12.0, x_ego0 + 12.0))
            guaranteed.append((x_ego0 + 16.0, 'car'))
        elif lane == 'slow':
            # a bicycle and a motorcycle near the ego in the middle of the scene
            guaranteed += [(x_mid + 6.0 - v * mid_t, 'bicycle'), (x_mid + 16.0 - v * mid_t, 'motorcycle')]
        elif lane == 'oncoming':
            guaranteed.append((x_mid + 14.0 - v * mid_t, 'bus'))
        for xc, name in guaranteed:
            size = b.det_size(name)
            fixed.append((xc - size[0] / 2, xc + size[0] / 2))
            attr = 'cycle.with_rider' if name in ('bicycle', 'motorcycle') else 'vehicle.moving'
            b.add(name, (xc, y), size, yaw, (v, 0.0), name, attr)
        if lane.endswith('slow'):
            kinds, probs = ['car', 'bicycle', 'motorcycle', 'truck', 'construction_vehicle'], [.45, .2, .2, .1, .05]
        else:
            kinds, probs = ['car', 'truck', 'bus'], [.75, .15, .1]
        for xc, (name, size) in _fill_track(rng, *span, fixed, vehicle_maker(kinds, probs),
                                            gap=(6.0, 30.0)):
            attr = 'cycle.with_rider' if name in ('bicycle', 'motorcycle') else 'vehicle.moving'
            b.add(name, (xc, y), size, yaw, (v, 0.0), name, attr)

    # -- parking strips (right side has a construction zone next to the ego's path)
    for side in (-1, 1):
        fixed = [(x_cross - 9, x_cross + 9)]
        if side == -1:
            za, zb = x_mid + 4.0, x_mid + 26.0
            fixed.append((za - 1, zb + 1))
            x = za
            while x < zb:       # barriers and cones lining the lane edge
                b.add('barrier', (x + 1.3, side * 7.75), b.det_size('barrier'), math.pi / 2,
                      det='barrier')
                b.add('traffic_cone', (x + 3.2, side * 7.75), b.det_size('traffic_cone'), 0.0,
                      det='traffic_cone')
                x += 4.0
            cv = b.det_size('construction_vehicle')
            cv = (min(cv[0], zb - za - 2), min(cv[1], 2.1), cv[2])
            b.add('construction_vehicle', ((za + zb) / 2, side * 9.15), cv, 0.0,
                  det='construction_vehicle', attr='vehicle.parked')
        else:
            tl = b.det_size('trailer')
            tl = (tl[0], min(tl[1], PARK_MAX_W), tl[2])
            b.add('trailer', (x_mid + 8.0, side * PARK_Y), tl, math.pi, det='trailer',
                  attr='vehicle.parked')
            fixed.append((x_mid + 8.0 - tl[0] / 2, x_mid + 8.0 + tl[0] / 2))
            tr = b.det_size('truck')
            tr = (tr[0], min(tr[1], PARK_MAX_W), tr[2])
            b.add('truck', (x_mid - 12.0, side * PARK_Y), tr, math.pi, det='truck',
                  attr='vehicle.parked')
            fixed.append((x_mid - 12.0 - tr[0] / 2, x_mid - 12.0 + tr[0] / 2))
        make = vehicle_maker(['car', 'truck', 'trailer'], [.8, .12, .08])
        for xc, (name, size) in _fill_track(rng, lo, hi, fixed, make, gap=(2.0, 25.0)):
            size = (size[0], min(size[1], PARK_MAX_W), size[2])
            yaw = (0.0 if side < 0 else math.pi) + rng.uniform(-0.01, 0.01)
            b.add(name, (xc, side * PARK_Y), size, yaw, det=name, attr='vehicle.parked')

    # -- sidewalks: walkers in two bands (one direction each), standing people and parked bikes
    for side in (-1, 1):
        for band, direction in ((WALK_Y[0], 1.0), (WALK_Y[1], -1.0)):
            v = direction * rng.uniform(1.0, 1.6)
            fixed = []
            if side == -1 and direction > 0:
                xc = x_mid + 3.0 - v * mid_t
                b.add('pedestrian', (xc, side * band), b.det_size('pedestrian'), 0.0, (v, 0.0),
                      'pedestrian', 'pedestrian.moving')
                fixed.append((xc - 1, xc + 1))

            def make_walker():
                return 0.8, None
            for xc, _ in _fill_track(rng, *span, fixed, make_walker, gap=(6.0, 40.0)):
                b.add('pedestrian', (xc, side * band), b.det_size('pedestrian'),
                      0.0 if v > 0 else math.pi, (v, 0.0), 'pedestrian', 'pedestrian.moving')
        fixed = [(x_cross - 9, x_cross + 9)]

        def make_stander():
            name = 'pedestrian' if rng.uniform() < 0.6 else 'bicycle'
            size = b.det_size(name)
            return (size[0], (name, size))
        for xc, (name, size) in _fill_track(rng, lo, hi, fixed, make_stander, gap=(4.0, 30.0)):
            if name == 'bicycle':
                b.add(name, (xc, side * STAND_Y), size, 0.0, det=name, attr='cycle.without_rider')
            else:
                b.add(name, (xc, side * STAND_Y), size, float(rng.uniform(-math.pi, math.pi)),
                      det=name, attr='pedestrian.standing')

    rows = b.rows
    world.cls = np.array([r[0] for r in rows], np.int64)
    world.det = [r[1] for r in rows]
    world.attr = [r[2] for r in rows]
    world.center = np.array([r[3] for r in rows], np.float64)
    world.size = np.array([r[4] for r in rows], np.float64)
    world.yaw = np.array([r[5] for r in rows], np.float64)
    world.vel = np.array([r[6] for r in rows], np.float64)
    world.tint = rng.uniform(0.85, 1.1, len(rows)).astype(np.float32)
    normals = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    shade = np.empty((len(rows), 6), np.float32)
    for i, yaw in enumerate(world.yaw):
        n = normals @ rot_z(yaw).T
        shade[i] = 0.45 + 0.6 * np.clip(n @ world.sun, 0, None)
    world.shade = shade
    return world


# ---- ray casting -------------------------------------------------------------------------------
def _box_hits(origin, dirs, center, half, yaw):
    """Slab test of rays origin + t*dirs against a yaw-only box.

    Returns (t_near, hit mask, face index 0..5 = +x,-x,+y,-y,+z,-z in box axes)."""
    c, s = math.cos(yaw), math.sin(yaw)
    p = origin - center
    px, py, pz = c * p[0] + s * p[1], -s * p[0] + c * p[1], p[2]
    dx = c * dirs[..., 0] + s * dirs[..., 1]
    dy = -s * dirs[..., 0] + c * dirs[..., 1]
    dz = dirs[..., 2]
    with np.errstate(divide='ignore', invalid='ignore'):
        tn, tf = [], []
        for pp, dd, hh in ((px, dx, half[0]), (py, dy, half[1]), (pz, dz, half[2])):
            inv = 1.0 / dd
            t1 = (-hh - pp) * inv
            t2 = (hh - pp) * inv
            tn.append(np.minimum(t1, t2))
            tf.append(np.maximum(t1, t2))
        tn = np.stack(tn, -1)
        t_near = tn.max(-1)
        t_far = np.minimum(np.minimum(tf[0], tf[1]), tf[2])
        hit = (t_near <= t_far) & (t_near > 1e-3)
    axis = tn.argmax(-1)
    d_axis = np.where(axis == 0, dx, np.where(axis == 1, dy, dz))
    face = axis * 2 + (d_axis > 0)
    return t_near, hit, face


def _box_corners(center, size, yaw) -> np.ndarray:
    l, w, h = size / 2
    x = np.array([1, 1, 1, 1, -1, -1, -1, -1]) * l
    y = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w
    z = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * h
    return np.stack([x, y, z], 1) @ rot_z(yaw).T + center


_BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4],
                       [0, 4], [1, 5], [2, 6], [3, 7]])


def ego_to_world(world: World, t: float) -> tuple:
    x, y, yaw = world.ego_pose(t)
    return rot_z(yaw), np.array([x, y, 0.0])


@dataclass
class CameraView:
    rgb: np.ndarray        # uint8 [H,W,3]
    depth: np.ndarray      # float32 [H,W] z-depth in the camera frame (inf = sky)
    obj: np.ndarray        # int32 [H,W] object index, -1 ground, -2 sky
    visible_px: np.ndarray  # (N,) visible pixels per object
    full_px: np.ndarray     # (N,) pixels each object would cover without occluders


def _pixel_axes(sensor: Sensor):
    """Normalised image coordinates of the pixel centres: x per column, y per row."""
    k = sensor.intrinsic
    xu = ((np.arange(sensor.width) - k[0, 2]) / k[0, 0]).astype(np.float32)
    yv = ((np.arange(sensor.height) - k[1, 2]) / k[1, 1]).astype(np.float32)
    return xu, yv


def _separable(m, xu, yv):
    """Components of m @ [x_u, y_v, 1] for every pixel, each built from one broadcast add."""
    m = m.astype(np.float32)
    return [(m[i, 0] * xu)[None, :] + (m[i, 1] * yv + m[i, 2])[:, None] for i in range(3)]


def _slab(p, dl, half, depth):
    """Slab test of pixel rays (local directions dl, local origin p) against a box of half size.

    Returns (t_near, hit, closer, entries): closer marks hits nearer than ``depth``, entries
    are the per-axis slab entry parameters (the largest one names the entered face)."""
    entries = []
    with np.errstate(divide='ignore', invalid='ignore'):
        t_near = t_far = None
        for k in range(3):
            inv = 1.0 / dl[k]
            t1 = (-half[k] - p[k]) * inv
            t2 = (half[k] - p[k]) * inv
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            entries.append(lo)
            t_near = lo if t_near is None else np.maximum(t_near, lo)
            t_far = hi if t_far is None else np.minimum(t_far, hi)
        hit = (t_near <= t_far) & (t_near > 1e-3)
    return t_near, hit, hit & (t_near < depth), entries


def all_box_corners(world: World, centers) -> np.ndarray:
    """(N, 8, 3) corners of every object box (corner order of _box_corners)."""
    unit = np.array([[1, 1, 1], [1, -1, 1], [1, -1, -1], [1, 1, -1],
                     [-1, 1, 1], [-1, -1, 1], [-1, -1, -1], [-1, 1, -1]], np.float64)
    local = unit[None] * (world.size[:, None, :] / 2)
    c, s = np.cos(world.yaw)[:, None], np.sin(world.yaw)[:, None]
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return np.stack([x, y, local[..., 2]], -1) + centers[:, None, :]


def render_camera(world: World, t: float, sensor: Sensor, centers=None, corners=None) -> CameraView:
    """Ray-cast one camera image of the world at time t."""
    r_e2w, t_e2w = ego_to_world(world, t)
    r_c2w = r_e2w @ sensor.rotation
    o = r_e2w @ sensor.translation + t_e2w
    xu, yv = _pixel_axes(sensor)
    dx, dy, dz = _separable(r_c2w, xu, yv)        # world directions, camera z-component 1
    h, w = sensor.height, sensor.width
    n_obj = len(world.cls)
    centers = world.centers(t) if centers is None else centers
    corners = all_box_corners(world, centers) if corners is None else corners

    # ground plane z = 0
    with np.errstate(divide='ignore'):
        depth = np.where(dz < -1e-6, np.float32(-o[2]) / dz, np.float32(np.inf)).astype(np.float32)
    obj = np.full((h, w), -1, np.int32)
    face = np.zeros((h, w), np.int32)
    full_px = np.zeros(n_obj, np.int64)

    # boxes: cull in one batch, then test only the pixels inside each remaining box's projected
    # (near-plane clipped) outline
    k = sensor.intrinsic
    near = 0.1
    cam = (corners - o) @ r_c2w                       # (N, 8, 3) camera frame
    zc = cam[..., 2]
    with np.errstate(divide='ignore', invalid='ignore'):
        u = cam[..., 0] / zc * k[0, 0] + k[0, 2]
        v = cam[..., 1] / zc * k[1, 1] + k[1, 2]
    all_front = zc.min(1) > near
    outside = all_front & ((u.max(1) < 0) | (u.min(1) >= w) | (v.max(1) < 0) | (v.min(1) >= h))
    e = _BOX_EDGES
    for i in np.nonzero((zc.max(1) > near) & ~outside)[0]:
        if all_front[i]:
            us, vs = u[i], v[i]
        else:
            pts, zi = cam[i], zc[i]
            za, zb = zi[e[:, 0]], zi[e[:, 1]]
            cross = (za - near) * (zb - near) < 0
            a_, b_ = pts[e[cross, 0]], pts[e[cross, 1]]
            f = ((near - za[cross]) / (zb[cross] - za[cross]))[:, None]
            pts = np.concatenate([pts[zi > near], a_ + f * (b_ - a_)])
            us = pts[:, 0] / pts[:, 2] * k[0, 0] + k[0, 2]
            vs = pts[:, 1] / pts[:, 2] * k[1, 1] + k[1, 2]
        u0, u1 = max(int(math.floor(us.min())), 0), min(int(math.ceil(us.max())) + 1, w)
        v0, v1 = max(int(math.floor(vs.min())), 0), min(int(math.ceil(vs.max())) + 1, h)
        if u0 >= u1 or v0 >= v1:
            continue
        r_w2b = rot_z(world.yaw[i]).T                  # world -> box axes
        p = r_w2b @ (o - centers[i])
        dl = _separable(r_w2b @ r_c2w, xu[u0:u1], yv[v0:v1])
        sub = depth[v0:v1, u0:u1]
        t_near, hit, closer, entries = _slab(p, dl, world.size[i] / 2, sub)
        full_px[i] = int(np.count_nonzero(hit))
        if not closer.any():
            continue
        tn = t_near[closer]
        sub[closer] = tn
        obj[v0:v1, u0:u1][closer] = i
        # entered face: the axis whose slab entry is t_near; the ray origin lies on that
        # face's outer side, so the sign of the origin's coordinate names the face
        ax = np.where(entries[0][closer] == tn, 0, np.where(entries[1][closer] == tn, 1, 2))
        face[v0:v1, u0:u1][closer] = 2 * ax + (p < 0)[ax]
    sky = (obj < 0) & ~np.isfinite(depth)
    ground = (obj < 0) & ~sky

    # colour = palette[index] * s + horizon colour * h (h: distance haze, or the sky gradient);
    # rows with no ground (or no sky) skip that part of the work
    n_mat = len(MATERIAL_RGB)
    sun_ground = 0.45 + 0.6 * max(world.sun[2], 0.0)
    palette = np.concatenate([
        (CLASS_RGB[world.cls][:, None, :] * (world.tint[:, None] * world.shade)[:, :, None]).reshape(-1, 3),
        MATERIAL_RGB * sun_ground, SKY_TOP[None]]).astype(np.float32) * np.float32(255.0)
    idx = obj * 6 + face
    dg = np.minimum(depth, np.float32(1e5))
    hz = 1.0 - np.exp(dg * np.float32(-1.0 / 350.0))
    s = 1.0 - hz
    rows_g = np.nonzero(ground.any(1))[0]
    if len(rows_g):
        g = slice(rows_g[0], rows_g[-1] + 1)
        gm = ground[g]
        mat, tex = world.ground_material(o[0] + dx[g] * dg[g], o[1] + dy[g] * dg[g])
        idx[g] = np.where(gm, n_obj * 6 + mat.astype(np.int32), idx[g])
        s[g] *= np.where(gm, tex, np.float32(1.0))
    rows_s = np.nonzero(sky.any(1))[0]
    if len(rows_s):
        q = slice(rows_s[0], rows_s[-1] + 1)
        sm = sky[q]
        el = dz[q] / np.sqrt(dx[q] * dx[q] + dy[q] * dy[q] + dz[q] * dz[q])
        f = np.clip(el * np.float32(3.0), 0, 1)
        idx[q][sm] = n_obj * 6 + n_mat
        s[q] = np.where(sm, f, s[q])
        hz[q] = np.where(sm, 1 - f, hz[q])
    rgb8 = np.empty((h, w, 3), np.uint8)
    horizon = SKY_HORIZON * np.float32(255.0)
    for c in range(3):
        ch = np.take(palette[:, c], idx)
        ch *= s
        ch += hz * horizon[c] + np.float32(0.5)
        np.clip(ch, 0, 255, out=ch)
        rgb8[..., c] = ch
    visible = np.bincount(obj[obj >= 0], minlength=n_obj)
    return CameraView(rgb8, depth, obj, visible, full_px)


@dataclass
class LidarScan:
    points: np.ndarray     # float32 (M,5) x y z intensity ring, lidar frame
    obj: np.ndarray        # (M,) object index, -1 ground
    cls: np.ndarray        # (M,) Occ3D class of the hit surface
    ranges: np.ndarray     # float32 (32, LIDAR_AZIMUTHS) hit range, inf where nothing was hit


def lidar_ray_dirs() -> np.ndarray:
    """Unit rays in the lidar frame, [ring, azimuth, 3]."""
    az = np.linspace(-math.pi, math.pi, LIDAR_AZIMUTHS, endpoint=False)
    el = LIDAR_ELEVATIONS
    return np.stack([np.cos(el)[:, None] * np.cos(az)[None, :],
                     np.cos(el)[:, None] * np.sin(az)[None, :],
                     np.sin(el)[:, None] * np.ones_like(az)[None, :]], -1)


def _wrap(a):
    return (a + math.pi) % (2 * math.pi) - math.pi


def cast_lidar(world: World, t: float, sensor: Sensor, centers=None) -> LidarScan:
    r_e2w, t_e2w = ego_to_world(world, t)
    r_l2w = r_e2w @ sensor.rotation
    o = r_e2w @ sensor.translation + t_e2w
    dirs_l = lidar_ray_dirs()
    d = dirs_l @ r_l2w.T                                       # [ring, azimuth, 3] world
    centers = world.centers(t) if centers is None else centers
    with np.errstate(divide='ignore'):
        rng_ = np.where(d[..., 2] < -1e-9, -o[2] / d[..., 2], np.inf)
    hit_obj = np.where(np.isfinite(rng_), -1, -2)
    mid = len(LIDAR_ELEVATIONS) // 2
    col_az = np.arctan2(d[mid, :, 1], d[mid, :, 0])
    dist = np.linalg.norm(centers[:, :2] - o[:2], axis=1)
    radius = np.linalg.norm(world.size[:, :2], axis=1) / 2
    pad = math.radians(1.0)
    for i in np.nonzero(dist < LIDAR_MAX_RANGE + radius)[0]:
        # test only the azimuth columns that can see the box (rays are nearly vertical fans)
        if dist[i] > radius[i] + 0.5:
            corners = _box_corners(centers[i], world.size[i], world.yaw[i])[:, :2] - o[:2]
            a_c = math.atan2(centers[i, 1] - o[1], centers[i, 0] - o[0])
            rel = _wrap(np.arctan2(corners[:, 1], corners[:, 0]) - a_c)
            dc = _wrap(col_az - a_c)
            cols = np.nonzero((dc >= rel.min() - pad) & (dc <= rel.max() + pad))[0]
            if len(cols) == 0:
                continue
        else:
            cols = np.arange(LIDAR_AZIMUTHS)
        tn, hit, _ = _box_hits(o, d[:, cols], centers[i], world.size[i] / 2, world.yaw[i])
        sub = rng_[:, cols]
        closer = hit & (tn < sub)
        sub[closer] = tn[closer]
        rng_[:, cols] = sub
        ho = hit_obj[:, cols]
        ho[closer] = i
        hit_obj[:, cols] = ho
    rng_ = rng_.reshape(-1)
    hit_obj = hit_obj.reshape(-1)
    d = d.reshape(-1, 3)
    dirs_l = dirs_l.reshape(-1, 3)
    valid = (hit_obj > -2) & (rng_ <= LIDAR_MAX_RANGE)
    ranges = np.where(valid, rng_, np.inf).astype(np.float32).reshape(len(LIDAR_ELEVATIONS), -1)
    idx = np.nonzero(valid)[0]
    xyz = dirs_l[idx] * rng_[idx, None]
    objs = hit_obj[idx]
    cls = np.empty(len(idx), np.int64)
    on_obj = objs >= 0
    cls[on_obj] = world.cls[objs[on_obj]]
    gp = o[None, :2] + d[idx[~on_obj], :2] * rng_[idx[~on_obj], None]
    mat, _ = world.ground_material(gp[:, 0], gp[:, 1])
    cls[~on_obj] = MATERIAL_CLASS[mat]
    intensity = np.empty(len(idx), np.float32)
    intensity[~on_obj] = MATERIAL_INTENSITY[mat]
    intensity[on_obj] = 20.0 + 5.0 * (world.cls[objs[on_obj]] % 8)
    ring = (idx // LIDAR_AZIMUTHS).astype(np.float32)
    pts = np.concatenate([xyz.astype(np.float32), intensity[:, None], ring[:, None]], 1)
    return LidarScan(pts, objs, cls, ranges)


# ---- Occ3D voxels --------------------------------------------------------------------------------
def voxel_centers_ego() -> tuple:
    x0, y0, z0 = OCC_RANGE[:3]
    nx, ny, nz = OCC_SHAPE
    return (x0 + (np.arange(nx) + 0.5) * OCC_VOXEL, y0 + (np.arange(ny) + 0.5) * OCC_VOXEL,
            z0 + (np.arange(nz) + 0.5) * OCC_VOXEL)


def voxelize(world: World, t: float, centers=None) -> np.ndarray:
    """Occ3D semantics [x,y,z] (uint8, 17 = free) of the world in the ego frame at time t."""
    sem = np.full(OCC_SHAPE, OCC_FREE, np.uint8)
    xs, ys, zs = voxel_centers_ego()
    r_e2w, t_e2w = ego_to_world(world, t)
    gx, gy = np.meshgrid(xs, ys, indexing='ij')
    wx = r_e2w[0, 0] * gx + r_e2w[0, 1] * gy + t_e2w[0]
    wy = r_e2w[1, 0] * gx + r_e2w[1, 1] * gy + t_e2w[1]
    mat, _ = world.ground_material(wx, wy)
    k_ground = int(math.floor((0.0 - OCC_RANGE[2]) / OCC_VOXEL))      # the layer holding z = 0
    sem[:, :, k_ground] = MATERIAL_CLASS[mat]
    centers = world.centers(t) if centers is None else centers
    ego_yaw = math.atan2(r_e2w[1, 0], r_e2w[0, 0])
    half_v = OCC_VOXEL / 2
    eps = 1e-4     # touching is not overlapping
    rel = (centers[:, :2] - t_e2w[:2]) @ r_e2w[:2, :2]           # object centres in the ego frame
    for i in np.nonzero(np.abs(rel).max(1) < 40.0 + np.linalg.norm(world.size[:, :2], axis=1))[0]:
        cx, cy = rel[i]
        phi = world.yaw[i] - ego_yaw
        c, s = abs(math.cos(phi)), abs(math.sin(phi))
        hl, hw = world.size[i, 0] / 2, world.size[i, 1] / 2
        ex, ey = c * hl + s * hw, s * hl + c * hw
        i0, i1 = np.searchsorted(xs, [cx - ex - half_v, cx + ex + half_v])
        j0, j1 = np.searchsorted(ys, [cy - ey - half_v, cy + ey + half_v])
        zb, zt = centers[i, 2] - world.size[i, 2] / 2, centers[i, 2] + world.size[i, 2] / 2
        k0, k1 = np.searchsorted(zs, [zb - half_v + eps, zt + half_v - eps])
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            continue
        dx = xs[i0:i1, None] - cx
        dy = ys[None, j0:j1] - cy
        u = math.cos(phi) * dx + math.sin(phi) * dy
        v = -math.sin(phi) * dx + math.cos(phi) * dy
        pad = half_v * (c + s)
        ok = ((np.abs(dx) < ex + half_v - eps) & (np.abs(dy) < ey + half_v - eps)
              & (np.abs(u) < hl + pad - eps) & (np.abs(v) < hw + pad - eps))
        sem[i0:i1, j0:j1, k0:k1][ok] = world.cls[i]
    return sem


def camera_mask(world: World, t: float, sensors: dict, views: dict) -> np.ndarray:
    """Voxels seen by a camera: inside its image and not behind the first surface along the ray."""
    xs, ys, zs = voxel_centers_ego()
    p = np.stack(np.meshgrid(xs, ys, zs, indexing='ij'), -1).reshape(-1, 3)
    seen = np.zeros(len(p), bool)
    tol = OCC_VOXEL * math.sqrt(3) / 2
    for name, view in views.items():
        sensor = sensors[name]
        q = (p - sensor.translation) @ sensor.rotation      # ego -> camera
        z = q[:, 2]
        front = z > 0.1
        k = sensor.intrinsic
        with np.errstate(divide='ignore', invalid='ignore'):
            u = np.rint(q[:, 0] / z * k[0, 0] + k[0, 2])
            v = np.rint(q[:, 1] / z * k[1, 1] + k[1, 2])
        inside = front & (u >= 0) & (u < sensor.width) & (v >= 0) & (v < sensor.height)
        idx = np.nonzero(inside & ~seen)[0]
        surf = view.depth[v[idx].astype(np.int64), u[idx].astype(np.int64)]
        seen[idx[z[idx] <= surf + tol]] = True
    return seen.reshape(OCC_SHAPE).astype(np.uint8)


def lidar_mask(sensor: Sensor, scan: LidarScan) -> np.ndarray:
    """Voxels a lidar beam passes through or ends in (range-image test against each voxel)."""
    xs, ys, zs = voxel_centers_ego()
    p = np.stack(np.meshgrid(xs, ys, zs, indexing='ij'), -1).reshape(-1, 3)
    q = (p - sensor.translation) @ sensor.rotation              # ego -> lidar
    r = np.linalg.norm(q, axis=1)
    el = np.arcsin(np.clip(q[:, 2] / np.maximum(r, 1e-6), -1, 1))
    az = np.arctan2(q[:, 1], q[:, 0])
    step = LIDAR_ELEVATIONS[1] - LIDAR_ELEVATIONS[0]
    ring = np.clip(np.rint((el - LIDAR_ELEVATIONS[0]) / step), 0, len(LIDAR_ELEVATIONS) - 1).astype(np.int64)
    col = np.rint((az + math.pi) / (2 * math.pi) * LIDAR_AZIMUTHS).astype(np.int64) % LIDAR_AZIMUTHS
    tol = OCC_VOXEL * math.sqrt(3) / 2
    near_beam = np.abs(el - LIDAR_ELEVATIONS[ring]) * r <= tol
    reach = np.minimum(scan.ranges[ring, col], LIDAR_MAX_RANGE)
    seen = (near_beam & (r <= reach + tol)).reshape(OCC_SHAPE)
    # the voxels holding the returns themselves are observed, whatever the beam geometry
    pe = scan.points[:, :3].astype(np.float64) @ sensor.rotation.T + sensor.translation
    ijk = np.floor((pe - np.array(OCC_RANGE[:3])) / OCC_VOXEL).astype(np.int64)
    ok = np.all((ijk >= 0) & (ijk < np.array(OCC_SHAPE)), axis=1)
    seen[ijk[ok, 0], ijk[ok, 1], ijk[ok, 2]] = True
    return seen.astype(np.uint8)


def det_object_ids(world: World) -> np.ndarray:
    return np.array([i for i, name in enumerate(world.det) if name], np.int64)


assert set(DET_SIZE) == set(DET_CLASSES)
