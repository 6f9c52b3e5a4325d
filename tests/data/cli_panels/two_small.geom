; Two small panels for the command-line tests (0.5 mm pixels, 10 x 6 each), a 2-row gap between them in the data.
; 'b' is turned by 180 degrees in its plane and 1 mm further from the sample.
clen = 0.08 m
photon_energy = 12398.42 eV    ; lambda = 1 A
res = 2000
adu_per_photon = 1
data = /data/data
dim0 = ss
dim1 = fs

a/min_fs = 0
a/max_fs = 9
a/min_ss = 0
a/max_ss = 5
a/fs = x
a/ss = y
a/corner_x = -5
a/corner_y = 0.5

b/min_fs = 0
b/max_fs = 9
b/min_ss = 8
b/max_ss = 13
b/fs = -x
b/ss = -y
b/corner_x = 5
b/corner_y = -0.5
b/coffset = 0.001
