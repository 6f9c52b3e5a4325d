; Two-panel test detector for nbtorch (hand-made values, 0.1 mm pixels).
; Pixel (fs 3, ss 7) of 'top' is centred at x = (-50 + 3.5) px, y = (10 + 7.5) px, z = 125 mm + 1 mm.

clen = 0.125 m          ; camera length
photon_energy = 9500 eV
res = 10000             ; pixels per metre: 0.1 mm pixels
adu_per_photon = 2
coffset = 0.001
data = /data/data
dim0 = ss
dim1 = fs

top/min_fs = 0
top/max_fs = 99
top/min_ss = 0
top/max_ss = 49
top/corner_x = -50
top/corner_y = 10
top/fs = x
top/ss = y

; 'bottom' is left-handed (fs x ss points back to the sample) and tilted about y
bottom/min_fs = 0
bottom/max_fs = 99
bottom/min_ss = 50
bottom/max_ss = 99
bottom/fs = -1.0y
bottom/ss = -0.8x +0.6z
bottom/corner_x = 20
bottom/corner_y = -5
bottom/coffset = -0.002

bad_gap/min_fs = 0
bad_gap/max_fs = 3
bad_gap/min_ss = 60
bad_gap/max_ss = 61
bad_gap/panel = bottom

bad_beamstop/min_x = -2.5
bad_beamstop/max_x = 2.5
bad_beamstop/min_y = -8
bad_beamstop/max_y = -6
