; Four panels in two rigid groups (older CrystFEL syntax); camera length and
; photon energy come from the data file.
clen = /instrument/detector/distance_mm
coffset = 0.5
photon_energy = /instrument/beam/energy_eV
adu_per_eV = 0.0005
res = 5000
dim0 = %
dim1 = ss
dim2 = fs
data = /entry/data/data
mask = /entry/data/mask
mask_good = 0x1
mask_bad = 0xfe

rigid_group_left = a0,a1
rigid_group_right = b0,b1
rigid_group_collection_halves = left,right

a0/min_fs = 0
a0/max_fs = 31
a0/min_ss = 0
a0/max_ss = 15
a0/fs = +0.0x +1.0y
a0/ss = -1.0x +0.0y
a0/corner_x = -40
a0/corner_y = 2

a1/min_fs = 32
a1/max_fs = 63
a1/min_ss = 0
a1/max_ss = 15
a1/fs = +1.0y
a1/ss = -1.0x
a1/corner_x = -40
a1/corner_y = 36

b0/min_fs = 0
b0/max_fs = 31
b0/min_ss = 16
b0/max_ss = 31
b0/fs = -1.0y
b0/ss = +1.0x
b0/corner_x = 40
b0/corner_y = -2
b0/no_index = true

b1/min_fs = 32
b1/max_fs = 63
b1/min_ss = 16
b1/max_ss = 31
b1/fs = -y
b1/ss = x
b1/corner_x = 40
b1/corner_y = -36
