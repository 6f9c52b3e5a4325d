; CSPAD-like detector (64 ASICs of 194 x 185 pixels in 32 2x1 sensors in 4 quadrants) as Cheetah writes it in
; CXI format, written for nbtorch's tests after the structure of CrystFEL's doc/examples/cspad-cxiformat.geom;
; positions are made up.

adu_per_eV = 0.00338                   ; ADU per eV
res = 9090.91                          ; pixels per metre (110 um)
clen = /LCLS/detector_1/EncoderValue   ; camera length (mm) from the data file
coffset = 0.5812                       ; added to the encoder value, in m
				       ;  (the encoder runs from -500 to 0)
photon_energy = /LCLS/photon_energy_eV ; photon energy (eV) from the data file

; frames, then slow scan, then fast scan
dim0 = %
dim1 = ss
dim2 = fs
data = /entry_1/data_1/data

; per-frame bad-pixel mask in the data file
mask = /entry_1/data_1/mask
mask_good = 0x0000
mask_bad = 0xffff

q0a0/min_fs = 0
q0a0/min_ss = 0
q0a0/max_fs = 193
q0a0/max_ss = 184
q0a0/fs = +0.004605x +0.999989y
q0a0/ss = -0.999989x +0.004605y
q0a0/corner_x = 219.969
q0a0/corner_y = 34.707

q0a1/min_fs = 194
q0a1/min_ss = 0
q0a1/max_fs = 387
q0a1/max_ss = 184
q0a1/fs = +0.004605x +0.999989y
q0a1/ss = -0.999989x +0.004605y
q0a1/corner_x = 221.717
q0a1/corner_y = 232.979

q0a2/min_fs = 0
q0a2/min_ss = 185
q0a2/max_fs = 193
q0a2/max_ss = 369
q0a2/fs = +0.007176x +0.999974y
q0a2/ss = -0.999974x +0.007176y
q0a2/corner_x = 425.257
q0a2/corner_y = 35.123

q0a3/min_fs = 194
q0a3/min_ss = 185
q0a3/max_fs = 387
q0a3/max_ss = 369
q0a3/fs = +0.007176x +0.999974y
q0a3/ss = -0.999974x +0.007176y
q0a3/corner_x = 426.692
q0a3/corner_y = 232.401

q0a4/min_fs = 0
q0a4/min_ss = 370
q0a4/max_fs = 193
q0a4/max_ss = 554
q0a4/fs = +0.999998x -0.002235y
q0a4/ss = +0.002235x +0.999998y
q0a4/corner_x = 35.505
q0a4/corner_y = 460.493

q0a5/min_fs = 194
q0a5/min_ss = 370
q0a5/max_fs = 387
q0a5/max_ss = 554
q0a5/fs = +0.999998x -0.002235y
q0a5/ss = +0.002235x +0.999998y
q0a5/corner_x = 232.290
q0a5/corner_y = 459.618

q0a6/min_fs = 0
q0a6/min_ss = 555
q0a6/max_fs = 193
q0a6/max_ss = 739
q0a6/fs = +0.999988x -0.004948y
q0a6/ss = +0.004948x +0.999988y
q0a6/corner_x = 34.741
q0a6/corner_y = 664.428

q0a7/min_fs = 194
q0a7/min_ss = 555
q0a7/max_fs = 387
q0a7/max_ss = 739
q0a7/fs = +0.999988x -0.004948y
q0a7/ss = +0.004948x +0.999988y
q0a7/corner_x = 232.013
q0a7/corner_y = 663.639

q0a8/min_fs = 0
q0a8/min_ss = 740
q0a8/max_fs = 193
q0a8/max_ss = 924
q0a8/fs = +0.999996x -0.002697y
q0a8/ss = +0.002697x +0.999996y
q0a8/corner_x = 460.812
q0a8/corner_y = 459.258

q0a9/min_fs = 194
q0a9/min_ss = 740
q0a9/max_fs = 387
q0a9/max_ss = 924
q0a9/fs = +0.999996x -0.002697y
q0a9/ss = +0.002697x +0.999996y
q0a9/corner_x = 657.758
q0a9/corner_y = 459.602

q0a10/min_fs = 0
q0a10/min_ss = 925
q0a10/max_fs = 193
q0a10/max_ss = 1109
q0a10/fs = +1.000000x +0.000499y
q0a10/ss = -0.000499x +1.000000y
q0a10/corner_x = 460.820
q0a10/corner_y = 665.763

q0a11/min_fs = 194
q0a11/min_ss = 925
q0a11/max_fs = 387
q0a11/max_ss = 1109
q0a11/fs = +1.000000x +0.000499y
q0a11/ss = -0.000499x +1.000000y
q0a11/corner_x = 656.342
q0a11/corner_y = 664.647

q0a12/min_fs = 0
q0a12/min_ss = 1110
q0a12/max_fs = 193
q0a12/max_ss = 1294
q0a12/fs = -0.006421x +0.999979y
q0a12/ss = -0.999979x -0.006421y
q0a12/corner_x = 644.170
q0a12/corner_y = 34.528

q0a13/min_fs = 194
q0a13/min_ss = 1110
q0a13/max_fs = 387
q0a13/max_ss = 1294
q0a13/fs = -0.006421x +0.999979y
q0a13/ss = -0.999979x -0.006421y
q0a13/corner_x = 642.927
q0a13/corner_y = 231.604

q0a14/min_fs = 0
q0a14/min_ss = 1295
q0a14/max_fs = 193
q0a14/max_ss = 1479
q0a14/fs = +0.000135x +1.000000y
q0a14/ss = -1.000000x +0.000135y
q0a14/corner_x = 849.152
q0a14/corner_y = 34.079

q0a15/min_fs = 194
q0a15/min_ss = 1295
q0a15/max_fs = 387
q0a15/max_ss = 1479
q0a15/fs = +0.000135x +1.000000y
q0a15/ss = -1.000000x +0.000135y
q0a15/corner_x = 849.115
q0a15/corner_y = 231.945

q1a0/min_fs = 388
q1a0/min_ss = 0
q1a0/max_fs = 581
q1a0/max_ss = 184
q1a0/fs = -0.999999x +0.001205y
q1a0/ss = -0.001205x -0.999999y
q1a0/corner_x = -34.659
q1a0/corner_y = 220.308

q1a1/min_fs = 582
q1a1/min_ss = 0
q1a1/max_fs = 775
q1a1/max_ss = 184
q1a1/fs = -0.999999x +0.001205y
q1a1/ss = -0.001205x -0.999999y
q1a1/corner_x = -232.730
q1a1/corner_y = 220.647

q1a2/min_fs = 388
q1a2/min_ss = 185
q1a2/max_fs = 581
q1a2/max_ss = 369
q1a2/fs = -0.999987x +0.005059y
q1a2/ss = -0.005059x -0.999987y
q1a2/corner_x = -34.995
q1a2/corner_y = 424.838

q1a3/min_fs = 582
q1a3/min_ss = 185
q1a3/max_fs = 775
q1a3/max_ss = 369
q1a3/fs = -0.999987x +0.005059y
q1a3/ss = -0.005059x -0.999987y
q1a3/corner_x = -231.075
q1a3/corner_y = 425.908

q1a4/min_fs = 388
q1a4/min_ss = 370
q1a4/max_fs = 581
q1a4/max_ss = 554
q1a4/fs = +0.002983x +0.999996y
q1a4/ss = -0.999996x +0.002983y
q1a4/corner_x = -460.033
q1a4/corner_y = 34.307

q1a5/min_fs = 582
q1a5/min_ss = 370
q1a5/max_fs = 775
q1a5/max_ss = 554
q1a5/fs = +0.002983x +0.999996y
q1a5/ss = -0.999996x +0.002983y
q1a5/corner_x = -460.033
q1a5/corner_y = 231.578

q1a6/min_fs = 388
q1a6/min_ss = 555
q1a6/max_fs = 581
q1a6/max_ss = 739
q1a6/fs = +0.006951x +0.999976y
q1a6/ss = -0.999976x +0.006951y
q1a6/corner_x = -665.619
q1a6/corner_y = 34.802

q1a7/min_fs = 582
q1a7/min_ss = 555
q1a7/max_fs = 775
q1a7/max_ss = 739
q1a7/fs = +0.006951x +0.999976y
q1a7/ss = -0.999976x +0.006951y
q1a7/corner_x = -664.495
q1a7/corner_y = 232.533

q1a8/min_fs = 388
q1a8/min_ss = 740
q1a8/max_fs = 581
q1a8/max_ss = 924
q1a8/fs = -0.000727x +1.000000y
q1a8/ss = -1.000000x -0.000727y
q1a8/corner_x = -460.771
q1a8/corner_y = 459.435

q1a9/min_fs = 582
q1a9/min_ss = 740
q1a9/max_fs = 775
q1a9/max_ss = 924
q1a9/fs = -0.000727x +1.000000y
q1a9/ss = -1.000000x -0.000727y
q1a9/corner_x = -459.346
q1a9/corner_y = 657.749

q1a10/min_fs = 388
q1a10/min_ss = 925
q1a10/max_fs = 581
q1a10/max_ss = 1109
q1a10/fs = +0.006164x +0.999981y
q1a10/ss = -0.999981x +0.006164y
q1a10/corner_x = -664.545
q1a10/corner_y = 460.738

q1a11/min_fs = 582
q1a11/min_ss = 925
q1a11/max_fs = 775
q1a11/max_ss = 1109
q1a11/fs = +0.006164x +0.999981y
q1a11/ss = -0.999981x +0.006164y
q1a11/corner_x = -664.372
q1a11/corner_y = 656.574

q1a12/min_fs = 388
q1a12/min_ss = 1110
q1a12/max_fs = 581
q1a12/max_ss = 1294
q1a12/fs = -0.999990x +0.004544y
q1a12/ss = -0.004544x -0.999990y
q1a12/corner_x = -35.272
q1a12/corner_y = 644.490

q1a13/min_fs = 582
q1a13/min_ss = 1110
q1a13/max_fs = 775
q1a13/max_ss = 1294
q1a13/fs = -0.999990x +0.004544y
q1a13/ss = -0.004544x -0.999990y
q1a13/corner_x = -231.373
q1a13/corner_y = 645.263

q1a14/min_fs = 388
q1a14/min_ss = 1295
q1a14/max_fs = 581
q1a14/max_ss = 1479
q1a14/fs = -0.999998x -0.001942y
q1a14/ss = +0.001942x -0.999998y
q1a14/corner_x = -34.856
q1a14/corner_y = 850.629

q1a15/min_fs = 582
q1a15/min_ss = 1295
q1a15/max_fs = 775
q1a15/max_ss = 1479
q1a15/fs = -0.999998x -0.001942y
q1a15/ss = +0.001942x -0.999998y
q1a15/corner_x = -232.698
q1a15/corner_y = 849.288

q2a0/min_fs = 776
q2a0/min_ss = 0
q2a0/max_fs = 969
q2a0/max_ss = 184
q2a0/fs = -0.002570x -0.999997y
q2a0/ss = +0.999997x -0.002570y
q2a0/corner_x = -219.167
q2a0/corner_y = -34.243

q2a1/min_fs = 970
q2a1/min_ss = 0
q2a1/max_fs = 1163
q2a1/max_ss = 184
q2a1/fs = -0.002570x -0.999997y
q2a1/ss = +0.999997x -0.002570y
q2a1/corner_x = -221.249
q2a1/corner_y = -232.867

q2a2/min_fs = 776
q2a2/min_ss = 185
q2a2/max_fs = 969
q2a2/max_ss = 369
q2a2/fs = +0.002485x -0.999997y
q2a2/ss = +0.999997x +0.002485y
q2a2/corner_x = -424.810
q2a2/corner_y = -34.992

q2a3/min_fs = 970
q2a3/min_ss = 185
q2a3/max_fs = 1163
q2a3/max_ss = 369
q2a3/fs = +0.002485x -0.999997y
q2a3/ss = +0.999997x +0.002485y
q2a3/corner_x = -425.437
q2a3/corner_y = -231.270

q2a4/min_fs = 776
q2a4/min_ss = 370
q2a4/max_fs = 969
q2a4/max_ss = 554
q2a4/fs = -0.999992x -0.003996y
q2a4/ss = +0.003996x -0.999992y
q2a4/corner_x = -35.821
q2a4/corner_y = -460.616

q2a5/min_fs = 970
q2a5/min_ss = 370
q2a5/max_fs = 1163
q2a5/max_ss = 554
q2a5/fs = -0.999992x -0.003996y
q2a5/ss = +0.003996x -0.999992y
q2a5/corner_x = -231.324
q2a5/corner_y = -460.417

q2a6/min_fs = 776
q2a6/min_ss = 555
q2a6/max_fs = 969
q2a6/max_ss = 739
q2a6/fs = -0.999992x +0.003939y
q2a6/ss = -0.003939x -0.999992y
q2a6/corner_x = -35.111
q2a6/corner_y = -664.130

q2a7/min_fs = 970
q2a7/min_ss = 555
q2a7/max_fs = 1163
q2a7/max_ss = 739
q2a7/fs = -0.999992x +0.003939y
q2a7/ss = -0.003939x -0.999992y
q2a7/corner_x = -232.912
q2a7/corner_y = -663.856

q2a8/min_fs = 776
q2a8/min_ss = 740
q2a8/max_fs = 969
q2a8/max_ss = 924
q2a8/fs = -0.999992x -0.003997y
q2a8/ss = +0.003997x -0.999992y
q2a8/corner_x = -460.809
q2a8/corner_y = -459.592

q2a9/min_fs = 970
q2a9/min_ss = 740
q2a9/max_fs = 1163
q2a9/max_ss = 924
q2a9/fs = -0.999992x -0.003997y
q2a9/ss = +0.003997x -0.999992y
q2a9/corner_x = -656.871
q2a9/corner_y = -460.531

q2a10/min_fs = 776
q2a10/min_ss = 925
q2a10/max_fs = 969
q2a10/max_ss = 1109
q2a10/fs = -0.999975x +0.007109y
q2a10/ss = -0.007109x -0.999975y
q2a10/corner_x = -460.683
q2a10/corner_y = -664.074

q2a11/min_fs = 970
q2a11/min_ss = 925
q2a11/max_fs = 1163
q2a11/max_ss = 1109
q2a11/fs = -0.999975x +0.007109y
q2a11/ss = -0.007109x -0.999975y
q2a11/corner_x = -656.059
q2a11/corner_y = -664.365

q2a12/min_fs = 776
q2a12/min_ss = 1110
q2a12/max_fs = 969
q2a12/max_ss = 1294
q2a12/fs = -0.005134x -0.999987y
q2a12/ss = +0.999987x -0.005134y
q2a12/corner_x = -645.109
q2a12/corner_y = -35.328

q2a13/min_fs = 970
q2a13/min_ss = 1110
q2a13/max_fs = 1163
q2a13/max_ss = 1294
q2a13/fs = -0.005134x -0.999987y
q2a13/ss = +0.999987x -0.005134y
q2a13/corner_x = -646.536
q2a13/corner_y = -231.537

q2a14/min_fs = 776
q2a14/min_ss = 1295
q2a14/max_fs = 969
q2a14/max_ss = 1479
q2a14/fs = -0.001694x -0.999999y
q2a14/ss = +0.999999x -0.001694y
q2a14/corner_x = -849.980
q2a14/corner_y = -35.097

q2a15/min_fs = 970
q2a15/min_ss = 1295
q2a15/max_fs = 1163
q2a15/max_ss = 1479
q2a15/fs = -0.001694x -0.999999y
q2a15/ss = +0.999999x -0.001694y
q2a15/corner_x = -850.319
q2a15/corner_y = -232.428

q3a0/min_fs = 1164
q3a0/min_ss = 0
q3a0/max_fs = 1357
q3a0/max_ss = 184
q3a0/fs = +0.999982x +0.005987y
q3a0/ss = -0.005987x +0.999982y
q3a0/corner_x = 34.526
q3a0/corner_y = -220.385

q3a1/min_fs = 1358
q3a1/min_ss = 0
q3a1/max_fs = 1551
q3a1/max_ss = 184
q3a1/fs = +0.999982x +0.005987y
q3a1/ss = -0.005987x +0.999982y
q3a1/corner_x = 232.063
q3a1/corner_y = -218.553

q3a2/min_fs = 1164
q3a2/min_ss = 185
q3a2/max_fs = 1357
q3a2/max_ss = 369
q3a2/fs = +0.999990x -0.004446y
q3a2/ss = +0.004446x +0.999990y
q3a2/corner_x = 35.801
q3a2/corner_y = -424.143

q3a3/min_fs = 1358
q3a3/min_ss = 185
q3a3/max_fs = 1551
q3a3/max_ss = 369
q3a3/fs = +0.999990x -0.004446y
q3a3/ss = +0.004446x +0.999990y
q3a3/corner_x = 231.124
q3a3/corner_y = -425.145

q3a4/min_fs = 1164
q3a4/min_ss = 370
q3a4/max_fs = 1357
q3a4/max_ss = 554
q3a4/fs = +0.005709x -0.999984y
q3a4/ss = +0.999984x +0.005709y
q3a4/corner_x = 460.543
q3a4/corner_y = -35.644

q3a5/min_fs = 1358
q3a5/min_ss = 370
q3a5/max_fs = 1551
q3a5/max_ss = 554
q3a5/fs = +0.005709x -0.999984y
q3a5/ss = +0.999984x +0.005709y
q3a5/corner_x = 460.582
q3a5/corner_y = -232.854

q3a6/min_fs = 1164
q3a6/min_ss = 555
q3a6/max_fs = 1357
q3a6/max_ss = 739
q3a6/fs = +0.000498x -1.000000y
q3a6/ss = +1.000000x +0.000498y
q3a6/corner_x = 664.883
q3a6/corner_y = -34.332

q3a7/min_fs = 1358
q3a7/min_ss = 555
q3a7/max_fs = 1551
q3a7/max_ss = 739
q3a7/fs = +0.000498x -1.000000y
q3a7/ss = +1.000000x +0.000498y
q3a7/corner_x = 664.100
q3a7/corner_y = -231.489

q3a8/min_fs = 1164
q3a8/min_ss = 740
q3a8/max_fs = 1357
q3a8/max_ss = 924
q3a8/fs = -0.007850x -0.999969y
q3a8/ss = +0.999969x -0.007850y
q3a8/corner_x = 460.122
q3a8/corner_y = -460.076

q3a9/min_fs = 1358
q3a9/min_ss = 740
q3a9/max_fs = 1551
q3a9/max_ss = 924
q3a9/fs = -0.007850x -0.999969y
q3a9/ss = +0.999969x -0.007850y
q3a9/corner_x = 458.027
q3a9/corner_y = -656.297

q3a10/min_fs = 1164
q3a10/min_ss = 925
q3a10/max_fs = 1357
q3a10/max_ss = 1109
q3a10/fs = +0.006563x -0.999978y
q3a10/ss = +0.999978x +0.006563y
q3a10/corner_x = 664.929
q3a10/corner_y = -459.605

q3a11/min_fs = 1358
q3a11/min_ss = 925
q3a11/max_fs = 1551
q3a11/max_ss = 1109
q3a11/fs = +0.006563x -0.999978y
q3a11/ss = +0.999978x +0.006563y
q3a11/corner_x = 666.615
q3a11/corner_y = -656.358

q3a12/min_fs = 1164
q3a12/min_ss = 1110
q3a12/max_fs = 1357
q3a12/max_ss = 1294
q3a12/fs = +1.000000x -0.000585y
q3a12/ss = +0.000585x +1.000000y
q3a12/corner_x = 34.378
q3a12/corner_y = -644.756

q3a13/min_fs = 1358
q3a13/min_ss = 1110
q3a13/max_fs = 1551
q3a13/max_ss = 1294
q3a13/fs = +1.000000x -0.000585y
q3a13/ss = +0.000585x +1.000000y
q3a13/corner_x = 231.238
q3a13/corner_y = -646.046

q3a14/min_fs = 1164
q3a14/min_ss = 1295
q3a14/max_fs = 1357
q3a14/max_ss = 1479
q3a14/fs = +0.999998x +0.001968y
q3a14/ss = -0.001968x +0.999998y
q3a14/corner_x = 34.704
q3a14/corner_y = -849.674

q3a15/min_fs = 1358
q3a15/min_ss = 1295
q3a15/max_fs = 1551
q3a15/max_ss = 1479
q3a15/fs = +0.999998x +0.001968y
q3a15/ss = -0.001968x +0.999998y
q3a15/corner_x = 231.361
q3a15/corner_y = -850.027

group_a0 = q0a0,q0a1
group_a1 = q0a2,q0a3
group_a2 = q0a4,q0a5
group_a3 = q0a6,q0a7
group_a4 = q0a8,q0a9
group_a5 = q0a10,q0a11
group_a6 = q0a12,q0a13
group_a7 = q0a14,q0a15
group_a8 = q1a0,q1a1
group_a9 = q1a2,q1a3
group_a10 = q1a4,q1a5
group_a11 = q1a6,q1a7
group_a12 = q1a8,q1a9
group_a13 = q1a10,q1a11
group_a14 = q1a12,q1a13
group_a15 = q1a14,q1a15
group_a16 = q2a0,q2a1
group_a17 = q2a2,q2a3
group_a18 = q2a4,q2a5
group_a19 = q2a6,q2a7
group_a20 = q2a8,q2a9
group_a21 = q2a10,q2a11
group_a22 = q2a12,q2a13
group_a23 = q2a14,q2a15
group_a24 = q3a0,q3a1
group_a25 = q3a2,q3a3
group_a26 = q3a4,q3a5
group_a27 = q3a6,q3a7
group_a28 = q3a8,q3a9
group_a29 = q3a10,q3a11
group_a30 = q3a12,q3a13
group_a31 = q3a14,q3a15

group_q0 = a0,a1,a2,a3,a4,a5,a6,a7
group_q1 = a8,a9,a10,a11,a12,a13,a14,a15
group_q2 = a16,a17,a18,a19,a20,a21,a22,a23
group_q3 = a24,a25,a26,a27,a28,a29,a30,a31

group_all = q0,q1,q2,q3
